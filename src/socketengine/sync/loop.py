"""The one I/O thread of an endpoint: a selector loop with thread-safe calls and timers.

Every socket of an endpoint (the listening socket and every connection) is served by
this one thread, so a host with a thousand clients runs on a constant number of
threads.  Other threads hand work to the loop with :meth:`Loop.call_soon`, which
wakes it through a socketpair.  It waits on ``epoll`` directly on Linux (:class:`_Epoll`)
and on a ``selectors`` selector elsewhere (:class:`_Selector`).

**The loop role.**  Everything the loop does -- handlers, queued calls, timers -- runs
while its thread holds :attr:`Loop.role`, a lock it lets go of only while it waits in
``select``.  A thread that needs one reply (``request()``, ``wait()`` on a client) may
take the role for a moment and read its connection itself
(:meth:`~socketengine.sync.connection.Connection.read_until`): while it holds the role
it *is* the loop (:meth:`Loop.in_thread` says so), so every rule written for the loop
thread holds for it too, and the reply saves a hand-over between threads.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Final, List, Optional, Tuple, Union

logger: Final = logging.getLogger("socketengine")

Handler = Callable[[int], None]


class TimerHandle:
    """A scheduled call; :meth:`cancel` stops it from running."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE


class _Epoll:
    """What the loop waits on, on Linux: ``epoll`` with a plain ``fd -> handler`` map.

    ``selectors.EpollSelector`` builds a key object per registration and per ready
    socket, and takes a socket off (``unregister``) to stop watching it; this poller
    keeps a socket registered with no events instead (``modify(sock, 0)``).  A thread
    reading its own reply (``read_until``) switches its socket's reads off and on
    around every round trip, so those steps are one ``epoll_ctl`` each.  Events mean
    what they mean for ``selectors``: an error or hang-up counts as both readable and
    writable, within what the socket is watched for.
    """

    def __init__(self) -> None:
        self._ep = select.epoll()
        #: fd -> [socket, events, handler]
        self._entries: Dict[int, List[Any]] = {}
        self._fds: Dict[Any, int] = {}  # socket -> fd (a closed socket forgets its fd)

    @staticmethod
    def _mask(events: int) -> int:
        return (select.EPOLLIN if events & _READ else 0) | (
            select.EPOLLOUT if events & _WRITE else 0
        )

    def register(self, sock: Any, events: int, handler: Handler) -> None:
        fd = sock.fileno()
        if fd < 0:
            raise ValueError(f"{sock!r} is closed")
        if sock in self._fds:
            raise KeyError(f"{sock!r} is already registered")
        self._ep.register(fd, self._mask(events))
        self._entries[fd] = [sock, events, handler]
        self._fds[sock] = fd

    def modify(self, sock: Any, events: int, handler: Handler) -> None:
        fd = self._fds[sock]
        entry = self._entries[fd]
        if events != entry[1]:
            self._ep.modify(fd, self._mask(events))
            entry[1] = events
        entry[2] = handler

    def unregister(self, sock: Any) -> None:
        fd = self._fds.pop(sock)
        entry = self._entries.get(fd)
        if entry is not None and entry[0] is sock:
            del self._entries[fd]
            try:
                self._ep.unregister(fd)
            except OSError:  # closed already: the kernel forgot it
                pass

    def select(self, timeout: Optional[float]) -> List[Tuple[Handler, int]]:
        ready = self._ep.poll(-1 if timeout is None else timeout)
        entries = self._entries
        out = []
        for fd, ev in ready:
            entry = entries.get(fd)
            if entry is None:
                continue
            mask = (
                (_READ if ev & ~select.EPOLLOUT else 0) | (_WRITE if ev & ~select.EPOLLIN else 0)
            ) & entry[1]
            if mask:
                out.append((entry[2], mask))
        return out

    def close(self) -> None:
        self._ep.close()
        self._entries.clear()
        self._fds.clear()


class _Selector:
    """What the loop waits on elsewhere: a ``selectors`` selector, where a socket
    watched for nothing is taken off (``selectors`` has no empty event set)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._idle: Dict[Any, Handler] = {}  # registered, watched for nothing

    def register(self, sock: Any, events: int, handler: Handler) -> None:
        if sock in self._idle:
            raise KeyError(f"{sock!r} is already registered")
        if events:
            self._sel.register(sock, events, handler)
        else:
            sock.fileno()  # a closed socket raises here, as on the other poller
            self._idle[sock] = handler

    def modify(self, sock: Any, events: int, handler: Handler) -> None:
        if sock in self._idle:
            if events:
                self._sel.register(sock, events, handler)
                del self._idle[sock]
            else:
                self._idle[sock] = handler
        elif events:
            self._sel.modify(sock, events, handler)
        else:
            self._sel.unregister(sock)
            self._idle[sock] = handler

    def unregister(self, sock: Any) -> None:
        if self._idle.pop(sock, None) is None:
            self._sel.unregister(sock)

    def select(self, timeout: Optional[float]) -> List[Tuple[Handler, int]]:
        return [(key.data, mask) for key, mask in self._sel.select(timeout)]

    def close(self) -> None:
        self._sel.close()
        self._idle.clear()


#: The poller each new loop makes: epoll where there is one.  A module variable, read
#: at each construction, so tests can choose the portable one.
poller: Callable[[], Union[_Epoll, _Selector]] = _Epoll if hasattr(select, "epoll") else _Selector


class Loop:
    """A selector loop running in one daemon thread named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.selector: Union[_Epoll, _Selector] = poller()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, _READ, self._on_wake)
        self._calls: Deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._timers: List[Tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._woken = False
        self._stopping = False
        self._closed = False  # the selector was closed (stop() of a loop that never ran)
        self._io_thread: Optional[threading.Thread] = None
        #: Held by whoever acts as the loop: its thread, except while it waits in select.
        self.role = threading.Lock()
        #: A thread other than the loop's own that holds :attr:`role` to read a reply.
        self.acting: Optional[threading.Thread] = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._io_thread is None:
            self._io_thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._io_thread.start()

    @property
    def running(self) -> bool:
        return self._io_thread is not None and self._io_thread.is_alive()

    def in_thread(self) -> bool:
        """True when called from the loop's thread, or from a thread acting as the loop
        (holding :attr:`role` to read its own reply)."""
        me = threading.current_thread()
        return me is self._io_thread or me is self.acting

    def stop(self, timeout: Optional[float] = 5.0) -> None:
        """Stop the loop after the calls already queued have run, and join its thread."""
        self._calls.append((self._set_stopping, ()))
        # Always send a wake byte here: a Ctrl-C (KeyboardInterrupt) that landed inside
        # an earlier wake(), between setting the flag and sending, would otherwise leave
        # the loop asleep and this join would time out.
        self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass
        thread = self._io_thread
        me = threading.current_thread()
        # ident is None for a thread whose start() was interrupted (Ctrl-C right there);
        # a thread acting as the loop holds the role the loop thread needs to finish.
        if thread is not None and thread is not me and me is not self.acting and thread.ident:
            try:
                thread.join(timeout)
            except RuntimeError:
                # "cannot join thread before it is started": the Ctrl-C came while the
                # new thread had its ident but had not yet said it started.  It runs the
                # stop queued above, or finds the selector closed below, and ends.
                pass
            if thread.is_alive():  # pragma: no cover - only if a handler hangs
                logger.warning("%s: I/O thread did not stop within %ss", self.name, timeout)
        if thread is None or not thread.is_alive():
            self._close_selector()

    def _set_stopping(self) -> None:
        self._stopping = True

    def _close_selector(self) -> None:
        self._closed = True
        try:
            self.selector.close()
        except Exception:  # pragma: no cover
            pass
        self._wake_r.close()
        self._wake_w.close()

    # -- cross-thread calls and timers ----------------------------------------------

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread (thread-safe, returns at once)."""
        self._calls.append((fn, args))
        self.wake()

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` on the loop thread after ``delay`` seconds (loop thread, or a
        thread acting as the loop)."""
        handle = TimerHandle(time.monotonic() + delay, fn)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        if threading.current_thread() is not self._io_thread:
            self.wake()  # it sleeps in select with a timeout computed without this timer
        return handle

    def _on_wake(self, mask: int) -> None:
        # Drain first, then clear the flag: clearing first would let a wake() that
        # lands between the two leave the flag set with its byte already drained,
        # and every later wake() would be skipped.  A call queued before the flag is
        # cleared still runs: queued calls are run after this handler.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._woken = False

    # -- registration (loop thread, or before start) --------------------------------

    def register(self, sock: Any, events: int, handler: Handler) -> None:
        self.selector.register(sock, events, handler)

    def modify(self, sock: Any, events: int, handler: Handler) -> None:
        """Change what ``sock`` is watched for; ``events`` 0: nothing, for now."""
        self.selector.modify(sock, events, handler)

    def unregister(self, sock: Any) -> None:
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        select = self.selector.select
        calls = self._calls
        timers = self._timers
        role = self.role
        role.acquire()
        try:
            while not self._stopping:
                timeout: Optional[float] = None
                if calls:
                    timeout = 0
                elif timers:
                    timeout = max(0.0, timers[0][0] - time.monotonic())
                role.release()
                try:
                    ready = select(timeout)
                except (ValueError, OSError):
                    if self._closed:
                        # stop() closed the selector of a thread whose start() a Ctrl-C
                        # interrupted before it ran: there is nothing left to serve.
                        return
                    raise
                finally:
                    role.acquire()
                # An event may be stale: a thread acting as the loop may have read that
                # socket meanwhile.  Handlers take a read that would block as "nothing".
                for handler, mask in ready:
                    try:
                        handler(mask)
                    except Exception:  # a handler must never kill the I/O thread
                        logger.exception("%s: error in I/O handler", self.name)
                while calls:
                    fn, args = calls.popleft()
                    try:
                        fn(*args)
                    except Exception:
                        logger.exception("%s: error in loop call %r", self.name, fn)
                if timers:
                    now = time.monotonic()
                    while timers and timers[0][0] <= now:
                        handle = heapq.heappop(timers)[2]
                        if not handle.cancelled:
                            try:
                                handle.fn()
                            except Exception:
                                logger.exception("%s: error in timer %r", self.name, handle.fn)
        finally:
            role.release()
            self._close_selector()
