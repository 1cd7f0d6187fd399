"""Encoder backends: interchangeable implementations of the masked ConvNeXt V2 encoder.

A backend is a function `forward(encoder, imgs, mask) -> latent` over the parameters of a
`ConvNeXtV2Encoder`; all backends share that one parameter layout, so a model trained with
one runs with any other.
"""
from fcmae.models.backends import minkowski
from fcmae.models.backends.dense import dense_forward
from fcmae.models.backends.sparse import sparse_forward

BACKENDS = {
    "dense": dense_forward,
    "sparse": sparse_forward,
    "minkowski": minkowski.minkowski_forward,  # optional: needs MinkowskiEngine
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def resolve_backend(name, device=None):
    """The concrete backend for `name`; "auto" picks the fastest installed exact backend."""
    if name == "auto":
        # The pure-PyTorch sparse backend is the fastest exact one on every device measured so far,
        # MinkowskiEngine included (see README, Benchmarks).
        return "sparse"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKEND_CHOICES)}")
    if name == "minkowski":
        minkowski.import_minkowski()  # a clear error, with the install command, when it is missing
    return name


def get_backend(name):
    return BACKENDS[resolve_backend(name)]


__all__ = ["BACKENDS", "BACKEND_CHOICES", "resolve_backend", "get_backend"]
