import gc
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable, Iterator, List, Optional

import pytest

from socketengine import Client, Host

# Ctrl-C as in a terminal: a suite started in the background by a non-interactive shell
# inherits SIGINT ignored, and the processes the tests start (the CLI) would too.  A
# handler is reset to the default by exec, an ignored signal is not.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def thread_frame(thread: threading.Thread) -> Optional[FrameType]:
    """The innermost Python frame ``thread`` runs now (``sys._current_frames()``), or None.

    The garbage collector is off meanwhile: CPython up to 3.11 may collect inside
    ``sys._current_frames()`` while it holds the runtime's thread-list lock, and a
    finalizer that takes that lock (a ``threading.local``'s) then deadlocks the process
    (python/cpython#106883; seen in CI, the main thread stuck in
    ``_PyThread_CurrentFrames`` -> ``gc_collect_main`` -> a lock wait)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames().get(thread.ident or -1)
    finally:
        if enabled:
            gc.enable()


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host(port=0)
    yield h
    h.close()


@pytest.fixture
def make_client(host: Host) -> Iterator[Callable[..., Client]]:
    made: List[Client] = []

    def make(**kwargs: Any) -> Client:
        kwargs.setdefault("port", host.port)
        c = Client(**kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every test must join the I/O threads it started."""
    before = {t for t in threading.enumerate() if t.name.startswith("socketengine")}
    yield
    wait_for(
        lambda: {t for t in threading.enumerate() if t.name.startswith("socketengine")} <= before,
        timeout=10,
        what="socketengine threads to stop",
    )


@pytest.fixture(params=["socket", "shm"])
def transfer(request: Any, monkeypatch: Any) -> Iterator[str]:
    """Run a test over both paths of large data sections: the socket (shared memory
    unavailable) and shared memory with a 1-byte threshold (every array and raw image
    frame as a descriptor).  Modules opt in with ``pytestmark``."""
    from socketengine import shm

    if request.param == "socket":
        monkeypatch.setattr(shm, "available", lambda: False)
    else:
        if not shm.available():
            pytest.skip("shared memory needs Linux memfd")
        init = shm.ShmWriter.__init__

        def every_array(self: Any, threshold: int) -> None:
            init(self, 1)

        monkeypatch.setattr(shm.ShmWriter, "__init__", every_array)
    yield request.param
