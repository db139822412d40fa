"""SIGTERM and SIGINT for commands that write files (see leader_edge.files).

    with signals_raise(): ...     # SIGTERM/SIGINT raise Interrupted (exit 143/130), so atomic writers clean up
    with signals_deferred(): ...  # held back until the block ends (a swap that must not be cut in two)

Every CLI command but serve runs under `signals_raise`. A main thread blocked in C when the signal
comes cannot raise; a watchdog then ends the process after LEADER_EDGE_SIGNAL_GRACE seconds.
Torch-free, like leader_edge.files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from leader_edge.errors import ConfigError

log = logging.getLogger(__name__)

class Interrupted(SystemExit):
    """SIGTERM or SIGINT under `signals_raise`: raised in the main thread so that every temporary is
    removed on the way out. Exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


# Seconds a process may still run after the first SIGTERM/SIGINT under `signals_raise` before it is
# ended without cleanup. Cleanup is renames and removals of temporaries: well under a second locally,
# seconds on NFS; a scheduler's own SIGKILL (Slurm's KillWait, Kubernetes' grace) comes after 30 s.
GRACE_ENV = "LEADER_EDGE_SIGNAL_GRACE"
DEFAULT_GRACE_S = 30.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_raising = False  # a `signals_raise` block is running in the main thread


@contextmanager
def signals_raise() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise `Interrupted` (the default SIGTERM action ends
    the process at once, leaving its temporaries). The first signal raises; later ones are ignored
    while the cleanup it started runs (SIGKILL still ends the process; the next run then removes
    what it left). Only the main thread can take signals: elsewhere this does nothing, and inside
    another `signals_raise` block (predict_file under the CLI) it leaves that one in charge.

    Python runs a handler only between bytecodes, so a main thread blocked in C (a gloo/NCCL
    collective whose peer is gone, a long torch op) never raises: the first signal also starts a
    watchdog that ends the process with os._exit(128 + signal) if it is still in the block
    LEADER_EDGE_SIGNAL_GRACE seconds later (default 30; inf: never). Leaving the block stops it.

    Raises:
        ConfigError: LEADER_EDGE_SIGNAL_GRACE is not a number of seconds >= 0.
    """
    global _raising
    if threading.current_thread() is not threading.main_thread() or _raising:
        yield
        return
    raised: list[int] = []

    def interrupted(signum, frame):
        if raised:
            log.warning("%s: already stopping, cleaning up", signal.Signals(signum).name)
            return
        raised.append(signum)
        raise Interrupted(signum)

    watchdog = _Watchdog(_grace())
    try:
        watchdog.start()
        _raising = True
        with _handling(interrupted):
            yield
    finally:
        _raising = False
        watchdog.stop()


def _grace() -> float:
    text = os.environ.get(GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_GRACE_S
    try:
        grace = float(text)
    except ValueError:
        grace = math.nan
    if not grace >= 0:
        raise ConfigError(f"{GRACE_ENV}={text!r} is not a number of seconds >= 0: set e.g. {GRACE_ENV}=60, "
                          f"or unset it for {DEFAULT_GRACE_S:g} s")
    return grace


class _Watchdog:
    """Ends the process `grace` seconds after the first SIGTERM/SIGINT unless stopped first.

    It must see a signal that Python has not handled yet (the main thread is blocked in C): the C
    handler writes each signal's number to the wakeup fd (`signal.set_wakeup_fd`) whatever thread
    took it, and a daemon thread reads that pipe. A wakeup fd set before is restored at the end and
    is given every byte meanwhile (a nested `signals_raise`, an asyncio loop). A forked child (a
    DataLoader worker) gets the wakeup fd it had before: its signals are not this process's."""

    active: list[_Watchdog] = []  # started and not stopped, outermost first

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.timer: threading.Timer | None = None
        self.previous = -1
        self.thread: threading.Thread | None = None
        self.stopped = False

    def start(self) -> None:
        if math.isinf(self.grace):
            return
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # set_wakeup_fd needs it: a signal handler must never block
        self.previous = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        _Watchdog.active.append(self)
        self.thread = threading.Thread(target=self._read, name="leader-edge-signal-watchdog", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = os.read(self.read_fd, 512)
                if not data or self.stopped:
                    return
                if self.previous != -1:
                    with contextlib.suppress(OSError):
                        os.write(self.previous, data)
                signum = next((s for s in data if s in _STOP_SIGNALS), None)
                if signum is not None and self.timer is None:
                    self.timer = threading.Timer(self.grace, self._exit, (signum,))
                    self.timer.name, self.timer.daemon = "leader-edge-signal-watchdog-timer", True
                    self.timer.start()
        finally:
            os.close(self.read_fd)

    def _exit(self, signum: int) -> None:
        # os.write, not logging: the blocked main thread may hold the logging or stderr lock.
        with contextlib.suppress(OSError):
            os.write(2, (f"leader-edge: still running {self.grace:g} s after {signal.Signals(signum).name} (blocked "
                         f"outside Python, e.g. in a collective): exiting {128 + signum} without cleanup; the next "
                         f"run removes its temp files ({GRACE_ENV} sets the grace)\n").encode())
        os._exit(128 + signum)

    def stop(self) -> None:
        if self.thread is None:
            return
        signal.set_wakeup_fd(self.previous)
        with contextlib.suppress(ValueError):
            _Watchdog.active.remove(self)
        self.stopped = True
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"\0")  # wakes the reader: a forked child may hold the pipe open, so no EOF
        os.close(self.write_fd)
        self.thread.join(timeout=5)
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()

    @staticmethod
    def forget_in_child() -> None:
        global _raising
        _raising = False  # the child's own `signals_raise`, if it runs one, is in charge of it
        if _Watchdog.active:
            with contextlib.suppress(ValueError, OSError):
                signal.set_wakeup_fd(_Watchdog.active[0].previous)
            _Watchdog.active.clear()


os.register_at_fork(after_in_child=_Watchdog.forget_in_child)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back for the block: they are recorded, then raised again once the old
    handlers are back (whatever those do: `Interrupted`, KeyboardInterrupt, the default exit).
    A stand-in handler, not pthread_sigmask: a signal sent to the process goes to any thread that
    does not block it (torch and gloo start threads), and CPython then runs the handler in the main
    thread all the same. Outside the main thread there is nothing to hold: handlers raise there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum, frame):
        pending.append(signum)

    try:
        with _handling(defer):
            yield
    finally:
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


@contextmanager
def _handling(handler) -> Iterator[None]:
    """`handler` for SIGTERM and SIGINT during the block; the handlers before it are put back after."""
    before = {}
    try:
        for s in _STOP_SIGNALS:
            before[s] = signal.getsignal(s)
            signal.signal(s, handler)
        yield
    finally:
        for s, old in before.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
