"""Preemption: the signals that ask a run to save a checkpoint and stop.

A cluster scheduler warns a job before it ends it (SLURM's `--signal`, Kubernetes' SIGTERM before
SIGKILL). While the loop trains, the handler here only records the signal: the training loop reads the record at its
next loss read-back, where the processes agree through the all-reduce they already make, save a
checkpoint at the same step and exit with PREEMPTED_EXIT_CODE. A second signal changes nothing,
so it cannot interrupt the save. Loader workers ignore these signals: a terminal's Ctrl-C or a
signal sent to a whole process group reaches them too, and the training process stops them.
"""
import atexit
import os
import signal
import threading
import weakref

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: "temporary failure, try again"; a rerun continues
DEFAULT_STOP_SIGNALS = "TERM,USR1,INT"


def parse_signals(text):
    """--stop_signals: 'TERM,USR1' (SIG prefix optional) -> ('SIGTERM', 'SIGUSR1'); 'none' -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = []
    for part in text.split(","):
        name = "SIG" + part.strip().upper().removeprefix("SIG")
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{part.strip()!r} is not a signal a process can catch (e.g. TERM, USR1, INT)")
        names.append(name)
    return tuple(dict.fromkeys(names))


class StopSignals:
    """Records the first of `names` the process receives; `received` is its name (None: none yet)."""

    def __init__(self, names):
        self.received = None
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals (a run started from a thread keeps the defaults)
        for name in names:
            self.previous[name] = signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            # os.write, not print: a handler may run in the middle of another print
            os.write(2, f"fcmae: received {name}: saving a checkpoint at the next loss read-back (within --log_every "
                        "steps) and stopping\n".encode())

    def uninstall(self):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)
        self.previous = {}


def ignore_signals(names, worker_id=None):
    """A DataLoader worker_init_fn (with functools.partial): the worker ignores `names`."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


_LOADERS_AT_EXIT = weakref.WeakSet()


def end_workers_at_exit(loader):
    """Shut `loader`'s persistent workers down when the interpreter exits, before multiprocessing
    ends its children: it ends them with SIGTERM, which workers that ignore the stop signals never
    see, and then waits for them for ever (a run whose evaluation loader was still alive at exit
    hung there). Registered after multiprocessing's own exit hook, so it runs first."""
    if not _LOADERS_AT_EXIT:
        atexit.unregister(end_workers)  # once, however often the set empties and fills again
        atexit.register(end_workers)
    _LOADERS_AT_EXIT.add(loader)


def end_workers():
    """The workers of every loader given to end_workers_at_exit, shut down (their loaders stay usable)."""
    for loader in list(_LOADERS_AT_EXIT):
        iterator = getattr(loader, "_iterator", None)  # a persistent loader keeps its iterator and workers here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
