"""Objects living in another process (multiprocessing 'spawn'), driven over a Pipe.

``Remote(SomeClass, args)`` starts a fresh interpreter that builds ``SomeClass(*args)``
and then runs the methods the parent names: ``call("measure", n, deadline)`` or the
split ``send(...)`` / ``result(timeout)`` to keep several processes busy at once.
Every wait has a timeout; a child whose parent vanishes (or goes quiet for
``CHILD_IDLE_LIMIT`` seconds) exits by itself; :meth:`Remote.shutdown` escalates from
``close()`` to terminate to kill.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Dict, Optional

from . import common

CHILD_IDLE_LIMIT = 300.0


class RemoteError(RuntimeError):
    """The child raised; the message carries its traceback."""


def _child(factory: Any, args: tuple, conn: Any, poll: float, wait: float) -> None:
    common.POLL_SLEEP = poll
    common.WAIT_SLEEP = wait
    common.raise_nofile()
    try:
        obj = factory(*args)
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", {"port": getattr(obj, "port", None), "pid": os.getpid()}))
    closed = False
    try:
        while True:
            if not conn.poll(CHILD_IDLE_LIMIT):
                break
            try:
                cmd, cargs = conn.recv()
            except (EOFError, OSError):
                break
            if cmd == "exit":
                break
            try:
                res = getattr(obj, cmd)(*cargs)
                conn.send(("ok", res))
            except BaseException as exc:
                conn.send(("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            if cmd == "close":
                closed = True
                break
    finally:
        if not closed:
            try:
                obj.close()
            except BaseException:
                pass


class Remote:
    """A ``factory(*args)`` object in a child process."""

    def __init__(self, factory: Any, args: tuple, timeout: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.name = getattr(factory, "__name__", str(factory))
        self.proc = ctx.Process(
            target=_child,
            args=(factory, args, child, common.POLL_SLEEP, common.WAIT_SLEEP),
            name=f"bench-{self.name}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self._busy = False
        self.info: Dict[str, Any] = self._wait(timeout, "start")
        self.pid: int = self.info["pid"]
        self.port: Optional[int] = self.info["port"]

    def _wait(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            alive = self.proc.is_alive()
            raise common.BenchTimeout(
                f"{self.name} child: no answer to {what!r} within {timeout:.0f} s"
                + ("" if alive else f" (it exited with code {self.proc.exitcode})")
            )
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RemoteError(
                f"{self.name} child died during {what!r} (exit code {self.proc.exitcode})"
            ) from None
        if status != "ok":
            raise RemoteError(f"{self.name} child failed in {what!r}:\n{value}")
        return value

    def send(self, cmd: str, *args: Any) -> None:
        self._conn.send((cmd, args))
        self._busy = True
        self._cmd = cmd

    def result(self, timeout: float) -> Any:
        self._busy = False
        return self._wait(timeout, self._cmd)

    def call(self, cmd: str, *args: Any, timeout: float = 60.0) -> Any:
        self.send(cmd, *args)
        return self.result(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """close() the object, then make sure the process is gone."""
        stuck = False
        if self.proc.is_alive() and self._busy:
            # A command is still running (another process failed first): take its
            # answer if it comes soon, else give up on a graceful close.
            try:
                self.result(min(timeout, 2.0))
            except common.BenchTimeout:
                stuck = True
            except BaseException:
                pass
        if self.proc.is_alive() and not stuck:
            try:
                self.call("close", timeout=timeout)
            except BaseException:
                pass
            self.proc.join(timeout=2.0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=2.0)
        if self.proc.is_alive():  # pragma: no cover
            self.proc.kill()
            self.proc.join(timeout=2.0)
        try:
            self._conn.close()
        except OSError:
            pass


def shutdown_all(*remotes: Optional[Remote], timeout: float = 10.0) -> None:
    for r in remotes:
        if r is not None:
            r.shutdown(timeout)
