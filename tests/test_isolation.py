"""``workflows.isolation.ChildWorker`` on real child processes: results and exceptions come back, a call
past its deadline is killed (also while native code holds the GIL), a segfault is a ``ChildCrashed``,
a call can extend its own deadline once it knows its size, and the worker recovers after each."""
from __future__ import annotations

import ctypes
import os
import time

import pytest

from workflows.isolation import CallTimeout, ChildCrashed, ChildWorker

TARGET = "test_isolation:work"


def work(kind: str, arg: float, budget):
    """The child's function: ``ok`` returns (pid, arg); ``raise``; ``hang`` sleeps in C holding the GIL;
    ``segv`` crashes; ``budget`` asks for ``arg`` seconds and then works for arg / 2 seconds."""
    if kind == "ok":
        return os.getpid(), arg
    if kind == "raise":
        raise KeyError(f"no such thing {arg}")
    if kind == "hang":
        ctypes.PyDLL(None).sleep(int(arg))
    if kind == "segv":
        ctypes.string_at(0)
    if kind == "budget":
        budget(arg)
        time.sleep(arg / 2)
        return "done"
    raise ValueError(kind)


def test_results_errors_timeouts_and_crashes():
    with ChildWorker(TARGET) as w:
        pid, v = w.call(("ok", 1.5), timeout_s=30)
        assert v == 1.5 and pid != os.getpid()
        assert w.call(("ok", 2), timeout_s=30)[0] == pid  # one child serves call after call
        with pytest.raises(KeyError, match="no such thing 7") as ei:
            w.call(("raise", 7), timeout_s=30)
        assert "KeyError" in ei.value.child_traceback
        t0 = time.monotonic()
        with pytest.raises(CallTimeout, match="killed"):
            w.call(("hang", 600), timeout_s=1.0)  # the GIL is held in C: only a kill ends it
        assert time.monotonic() - t0 < 15
        with pytest.raises(ChildCrashed, match="SIGSEGV"):
            w.call(("segv", 0), timeout_s=30)
        new_pid, _ = w.call(("ok", 0), timeout_s=30)  # a fresh child after the timeout and the crash
        assert new_pid not in (pid, os.getpid())
        assert w.call(("budget", 3.0), timeout_s=0.5) == "done"  # 1.5 s of work within its own 3 s budget
