"""Child processes end with their parent.

A worker whose main process was killed with SIGKILL gets no message: it finishes its task for nobody, then
waits forever on a pipe or a lock, holding its memory. `end_with_parent` makes such a child end within
moments of its parent.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h
_watched: dict[int, int] = {}  # this process's pid -> the parent it ends with


def end_with_parent(parent_pid: int, kernel: bool = True, poll_s: float = 0.5) -> None:
    """Makes this process end when its parent `parent_pid` does; call it first thing in the child.

    kernel=True on Linux: the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG), which
    works whatever the child is blocked on. It fires when the *thread* that started the child ends, so use
    it only for children started by a thread that lives as long as they are needed. Otherwise (and on
    other systems) a daemon thread checks every `poll_s` seconds whether the parent is still the parent
    (an orphan is handed to another process) and ends this one if not.
    """
    if _watched.get(os.getpid()) == parent_pid:  # already tied (a fork starts untied: the key is its pid)
        return
    _watched[os.getpid()] = parent_pid
    if not (kernel and _kernel_signal()):
        threading.Thread(target=_watch, args=(parent_pid, poll_s), daemon=True, name="llamazoo-parent-watch").start()
    if os.getppid() != parent_pid:  # the parent ended before it was watched
        os._exit(1)


def _kernel_signal() -> bool:
    """PR_SET_PDEATHSIG = SIGKILL for this process; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            os._exit(1)
