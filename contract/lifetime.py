"""Child processes that end with the process that started them, however it ends.

A supervisor killed with ``kill -9`` (or by the OOM killer) runs no clean-up of its own, and its
children, each in a session of its own, would live on as orphans: an API holding the port, an
embedded Redis, a worker training with nobody watching. Linux's parent-death signal has the
kernel signal a child when its parent goes; ``parent_death_signal`` arms it in the child, as
``subprocess.Popen``'s ``preexec_fn``. The kernel sends it when the *thread* that forked the
child exits, so start such children from the main thread. Other systems have no such signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``signum`` when this process (the
    calling thread) ends; None where the system has no such signal. The C function is looked up
    here, in the parent: between fork and exec the child should do no more than call it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm
