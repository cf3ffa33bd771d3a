"""Run calls of one function in a child process that the caller can kill: a hang or a crash in native
code (a decoder stuck in C while holding the GIL, a segfault) costs that call, not the caller.

    with ChildWorker("workflows.ingest:_decode_in_child") as w:
        value = w.call(args, timeout_s=60)     # raises CallTimeout / ChildCrashed, or the call's exception

Choices:
- One long-lived child per ``ChildWorker``, serving calls one after another over a socket pair; a
  child that timed out (killed) or crashed is replaced on the next call. The child is a fresh
  interpreter (``python -c``, the caller's ``sys.path``), not a fork: forking the caller (a Ray worker
  with gRPC threads) is unsafe, and multiprocessing's ``spawn``/``forkserver`` re-run the caller's
  ``__main__`` (a Ray worker's ``default_worker.py``, or nothing at all for ``python -`` ). Its start
  (imports, ~1-2 s) is paid once per worker process, since callers keep one ``ChildWorker`` alive.
- Deadlines scale with the work: the called function gets a ``budget(seconds)`` callback and may
  reset its own deadline once it knows the size of the job (ingest: after probing the video's
  duration). Until it does, the call's ``timeout_s`` applies.
- The child dies with its parent: on Linux it asks the kernel for SIGKILL when the process (thread)
  that started it goes away, so a hung decode never outlives a killed Ray task.
- Exceptions raised by the function come back pickled (attributes included) and are re-raised in the
  caller; only a timeout or a dead child becomes ``CallTimeout`` / ``ChildCrashed``.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable


class CallTimeout(RuntimeError):
    """The call did not finish within its deadline; the child was killed."""
    reason = "timeout"


class ChildCrashed(RuntimeError):
    """The child process died during the call (a segfault, abort, OOM kill)."""
    reason = "decoder_crash"


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the child still exits on EOF when it is not stuck
        pass


def _child_main(conn, target: str) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fn = _resolve(target)
    conn.send(("ready", os.getpid()))

    def budget(seconds: float) -> None:
        conn.send(("budget", float(seconds)))

    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        if args is None:
            return
        try:
            value = fn(*args, budget=budget)
            msg = ("ok", value)
        except Exception as e:  # noqa: BLE001 - handed to the caller, who decides
            e.child_traceback = traceback.format_exc(limit=5)
            msg = ("raised", e)
        try:
            conn.send(msg)
        except (pickle.PicklingError, TypeError, AttributeError) as pe:
            conn.send(("raised", RuntimeError(f"{type(msg[1]).__name__} could not be sent back: {pe}")))


def _child_entry(fd: int, target: str, path: str) -> None:
    """``python -c`` entry point of a child: the caller's ``sys.path``, then serve calls on ``fd``."""
    sys.path[:] = json.loads(path)
    _child_main(Connection(fd), target)


_BOOT = "import sys; from workflows.isolation import _child_entry; _child_entry(int(sys.argv[1]), *sys.argv[2:])"


class ChildWorker:
    """A killable child process that runs ``target`` (``"module:function"``) call by call."""

    def __init__(self, target: str, start_timeout_s: float = 300.0):
        self.target = target
        self.start_timeout_s = start_timeout_s  # interpreter + imports; not part of any call's deadline
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one call at a time: the child serves calls in order

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), self.target, json.dumps(sys.path)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(mine.detach())
        try:
            ready = self._conn.poll(self.start_timeout_s) and self._conn.recv()[0] == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self._proc.poll()
            self._kill()
            raise ChildCrashed(f"the child process for {self.target} did not start (exit code {code})")

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=30)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, args: tuple, timeout_s: float) -> Any:
        """``target(*args, budget=...)`` in the child; ``timeout_s`` until the call sets its own budget."""
        with self._lock:
            return self._call(args, timeout_s)

    def _call(self, args: tuple, timeout_s: float) -> Any:
        if not self._alive():
            self._kill()
            self._start()
        self._conn.send(args)
        t0 = time.monotonic()
        deadline, limit = t0 + timeout_s, f"{timeout_s:.1f} s"
        while True:
            left = deadline - time.monotonic()
            try:
                ready = left > 0 and self._conn.poll(left)
            except (EOFError, OSError):
                ready = True
            if not ready:
                self._kill()
                raise CallTimeout(f"did not finish within {time.monotonic() - t0:.1f} s (limit {limit}); "
                                  f"the child process was killed")
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.wait(timeout=30)
                self._kill()
                how = (f"signal {signal.Signals(-code).name}" if code is not None and code < 0
                       else f"exit code {code}")
                raise ChildCrashed(f"the child process died ({how})") from None
            if kind == "budget":
                deadline, limit = time.monotonic() + value, f"{value:.1f} s from its own budget"
            elif kind == "ok":
                return value
            else:
                raise value

    def close(self) -> None:
        if self._conn is not None and self._alive():
            try:
                self._conn.send(None)
                self._proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()

    def __enter__(self) -> "ChildWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
