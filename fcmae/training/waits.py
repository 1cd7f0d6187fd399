"""Where the host may wait for the device, and where it must not.

On a GPU a step is only as fast as the host keeps the device's queue full, so nothing in a
training step or an evaluation batch may make the host wait: no value read back (`.item()`,
`float()`, `bool()`, `.tolist()`), no operation whose output size depends on the data
(`nonzero`, boolean indexing), no copy to the device from pageable memory or without
`non_blocking`, no copy to the host. The engine marks those regions with `no_wait(what)`.

A few places are built to wait, and are marked `designed_wait(what)`:
- the loss read-back, every --log_every steps, before a checkpoint and at an epoch's end (one
  transfer for all the steps since the last one, with the gradient norm of a logged step);
- checkpoint saves (and the best weights of fine-tuning);
- the totals of an evaluation, once per evaluation;
- the reconstruction pictures (at an epoch's end, and every --vis_every steps when asked).

Nothing happens here unless a watcher listens: `python -m fcmae.bench --sync_check`
(fcmae.training.sync_check) runs the training scripts' steps on a stand-in device and reports
every waiting operation inside a `no_wait` region, and counts those inside `designed_wait`
regions apart; on a CUDA GPU it turns torch.cuda.set_sync_debug_mode("error") on inside the
`no_wait` regions instead.
"""
import contextlib

NO_WAIT, DESIGNED_WAIT = "no wait", "designed wait"

_watchers = []  # objects with enter(kind, what) and exit(kind, what)


@contextlib.contextmanager
def region(kind, what):
    if not _watchers:  # the usual case: nothing to tell
        yield
        return
    for watcher in _watchers:
        watcher.enter(kind, what)
    try:
        yield
    finally:
        for watcher in reversed(_watchers):
            watcher.exit(kind, what)


def no_wait(what):
    """A region in which nothing may make the host wait for the device (an optimiser step, an
    evaluation batch); `what` names it in reports."""
    return region(NO_WAIT, what)


def designed_wait(what):
    """A region built to wait for the device (see the module's text); `what` names it."""
    return region(DESIGNED_WAIT, what)


@contextlib.contextmanager
def watching(watcher):
    """Tell `watcher` of every region entered and left inside the block."""
    _watchers.append(watcher)
    try:
        yield watcher
    finally:
        _watchers.remove(watcher)
