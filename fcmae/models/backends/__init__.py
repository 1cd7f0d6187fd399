"""Encoder backends: interchangeable implementations of the masked ConvNeXt V2 encoder.

A backend is a record (fcmae.models.backends.record.Backend) around a function
`forward(encoder, imgs, mask) -> latent` over the parameters of a `ConvNeXtV2Encoder`; all
backends share that one parameter layout, so a model trained with one runs with any other. A
new backend is one file defining its `BACKEND` record, and one line in BACKENDS below.
"""
from fcmae.models.backends import dense, minkowski, sparse
from fcmae.models.backends.record import Backend

BACKENDS = {backend.name: backend for backend in (
    dense.BACKEND,
    sparse.BACKEND,
    minkowski.BACKEND,
)}
BACKEND_CHOICES = ("auto", *BACKENDS)


def resolve_backend(name, device=None):
    """The name of the concrete backend for `name`: "auto" picks the available backend that ranks
    first; a named one must be installed (ValueError, one sentence, when it is not)."""
    if name == "auto":
        ranked = sorted((b for b in BACKENDS.values() if b.auto_rank is not None), key=lambda b: b.auto_rank)
        return next(b.name for b in ranked if b.available(device))
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    reason = BACKENDS[name].cannot_run()
    if reason:
        raise ValueError(reason)
    return name


def runnable(device=None, compiled=False):
    """The records of the backends that run on `device` (and compile, when `compiled`), in
    BACKENDS order."""
    return [b for b in BACKENDS.values() if b.available(device) and (b.compiles or not compiled)]


def get_backend(name):
    """The record of backend `name` (or of what "auto" chooses)."""
    return BACKENDS[resolve_backend(name)]


__all__ = ["Backend", "BACKENDS", "BACKEND_CHOICES", "resolve_backend", "runnable", "get_backend"]
