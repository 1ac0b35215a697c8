"""What the asyncio Host and Client share: limits, callbacks, waiters, subscriptions."""

from __future__ import annotations

import asyncio
import logging
from typing import (
    Any,
    Callable,
    Coroutine,
    Dict,
    List,
    Optional,
    Set,
    Tuple,
    TypeVar,
    Union,
    overload,
)

from .. import frames, images
from ..errors import ConnectionClosed, EndpointClosed
from ..protocol import token_bytes
from .connection import Connection, wait_bounded
from .subscription import Subscription

__all__ = ["Endpoint", "DEFAULT_SUBSCRIPTION_SIZE"]

logger = logging.getLogger("socketengine")

_E = TypeVar("_E", bound="Endpoint")
_F = TypeVar("_F", bound=Callable[..., Any])

#: Default ``maxsize`` of a subscription (items waiting unread).
DEFAULT_SUBSCRIPTION_SIZE = 10_000


class Endpoint:
    """Base of :class:`~socketengine.aio.Host` and :class:`~socketengine.aio.Client`."""

    _kind = "endpoint"
    #: Host: callbacks get ``(value, conn)`` and waiters/subscriptions yield pairs.
    _with_conn = False

    def __init__(
        self,
        addr: str,
        port: int,
        *,
        timeout: float,
        token: Union[str, bytes, None],
        max_message: int,
        handshake_timeout: float,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
        if max_message < 1024:
            raise ValueError("max_message must be at least 1024 bytes")
        if timeout is None or timeout < 0:
            raise ValueError("timeout must be a number of seconds >= 0")
        self.addr = addr
        self._port = port
        self.timeout = float(timeout)
        self.max_message = int(max_message)
        self.handshake_timeout = float(handshake_timeout)
        self._token = token_bytes(token)
        self.opened = False
        self.stopped = False
        self._start_lock: Optional[asyncio.Lock] = None
        # Tuples, replaced on change: a queued callback job keeps the handlers it saw.
        self._handlers: Dict[str, Tuple[Callable[..., Any], ...]] = {}
        self._subs: Dict[str, Tuple[Subscription[Any], ...]] = {}
        self._waiters: Dict[str, List[asyncio.Future[Any]]] = {}
        self._tasks: Set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The TCP port (a host's real one once started with ``port=0``)."""
        return self._port

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self: _E) -> _E:
        """Open the endpoint (once; concurrent and repeated calls are harmless);
        return it."""
        self._check_not_closed()
        if self.opened:
            return self
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            self._check_not_closed()
            if not self.opened:
                await self._open()
                self.opened = True
                logger.info("%r: started", self)
        return self

    async def _open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        """Close the endpoint."""
        raise NotImplementedError

    async def __aenter__(self: _E) -> _E:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _check_not_closed(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"{self!r} is closed; create a new {self._kind}")

    def _check_open(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"cannot write: {self!r} is closed; create a new {self._kind}")
        if not self.opened:
            raise EndpointClosed(f"cannot write: {self!r} is not started; await start() first")

    # -- callbacks ------------------------------------------------------------------------

    @overload
    def on(self, channel: str) -> Callable[[_F], _F]: ...

    @overload
    def on(self, channel: str, fn: _F) -> _F: ...

    def on(self, channel: str, fn: Optional[_F] = None) -> Any:
        """Call ``fn`` for every message on ``channel``; use as ``@ep.on("name")``.

        ``fn`` may be a plain or an ``async`` function.  A client calls ``fn(data)``,
        a host ``fn(data, conn)``.  Requests on ``channel`` are answered with the
        return value (awaited if it is awaitable) of the first handler registered.
        Exceptions are logged on the ``socketengine`` logger and change nothing else.
        Returns ``fn``.
        """
        frames.channel_bytes(channel)  # TypeError/ValueError for a bad name, now

        def register(fn: _F) -> _F:
            if not callable(fn):
                raise TypeError(f"on({channel!r}) needs a callable, not {fn!r}")
            self._handlers[channel] = self._handlers.get(channel, ()) + (fn,)
            return fn

        if fn is None:
            return register
        return register(fn)

    def off(self, channel: str, fn: Callable[..., Any]) -> None:
        """Unregister ``fn`` from ``channel`` (no error if it was not registered)."""
        handlers = tuple(h for h in self._handlers.get(channel, ()) if h is not fn)
        if handlers:
            self._handlers[channel] = handlers
        else:
            self._handlers.pop(channel, None)

    # -- waiting and subscribing ----------------------------------------------------------

    def _check_receiving(self) -> None:
        """Raise if nothing more can arrive (closed endpoint, lost connection)."""
        self._check_not_closed()

    async def _wait(self, channel: str, timeout: Optional[float]) -> Any:
        self._check_receiving()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        try:
            return await wait_bounded(
                future, timeout, f"no message on channel {channel!r} within {timeout} s"
            )
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[channel]

    def _subscribe(self, channel: str, maxsize: int) -> Subscription[Any]:
        frames.channel_bytes(channel)
        self._check_receiving()
        sub: Subscription[Any] = Subscription(channel, maxsize, self._unsubscribe)
        self._subs[channel] = self._subs.get(channel, ()) + (sub,)
        return sub

    def _unsubscribe(self, sub: Subscription[Any]) -> None:
        subs = tuple(s for s in self._subs.get(sub.channel, ()) if s is not sub)
        if subs:
            self._subs[sub.channel] = subs
        else:
            self._subs.pop(sub.channel, None)

    def _end_delivery(self, error: BaseException, sub_error: Optional[BaseException]) -> None:
        """Nothing more will arrive: fail waiters with ``error``; end subscriptions
        (raising ``sub_error`` after their items, if given)."""
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)
        for subs in list(self._subs.values()):
            for sub in subs:
                sub._end(sub_error)

    # -- images ---------------------------------------------------------------------------

    @staticmethod
    def _check_image(img: Any) -> Any:
        """Validate an image (TypeError / ValueError); the threaded layer's rules."""
        images.validate(img, "raw")
        return img

    # -- tasks ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task that :meth:`close` waits for (bounded) or cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_tasks(self, timeout: float) -> None:
        """Let running callbacks finish for up to ``timeout`` s, then cancel them."""
        tasks = set(self._tasks)
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            logger.info("%r: cancelled %d callback(s) still running at close", self, len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    # -- connection events (event loop) ---------------------------------------------------

    def _connection_made(self, conn: Connection) -> Optional[Tuple[str, str]]:
        """A transport connected; return ``(reason, code)`` to refuse it."""
        return None

    def _connection_ready(self, conn: Connection) -> None:
        """The handshake of ``conn`` completed."""

    def _connection_closed(self, conn: Connection) -> None:
        """``conn`` is closed and every frame it received has been handled."""

    def _store(self, channel: str, value: Any) -> None:
        """Record the endpoint-wide latest value of ``channel``."""

    def _deliver(self, conn: Connection, channel: str, value: Any) -> None:
        """A DATA value arrived: store it, then waiters, subscriptions, callbacks."""
        conn.values[channel] = value
        self._store(channel, value)
        item = (value, conn) if self._with_conn else value
        waiters = self._waiters.pop(channel, None)
        if waiters is not None:
            for future in waiters:
                if not future.done():
                    future.set_result(item)
        subs = self._subs.get(channel)
        if subs is not None:
            for sub in subs:
                if sub._put(item):
                    conn._block(sub)
        handlers = self._handlers.get(channel)
        if handlers is not None:
            args = (value, conn) if self._with_conn else (value,)
            conn._chain.call((handlers, args, None, f"channel {channel!r}"))

    def _answer(self, conn: Connection, channel: str, fid: int, value: Any) -> None:
        """A REQUEST arrived: run the channel's handlers; the first one's result replies."""
        handlers = self._handlers.get(channel)
        if handlers is None:
            conn._send_error(channel, fid, f"no handler for requests on channel {channel!r}")
            return

        def reply(result: Any, exc: Optional[BaseException]) -> None:
            conn._send_reply(channel, fid, result, exc)

        args = (value, conn) if self._with_conn else (value,)
        conn._chain.call((handlers, args, reply, f"requests on channel {channel!r}"))

    def _lost_error(self, conn: Connection) -> ConnectionClosed:
        return ConnectionClosed(
            f"the connection to {conn._peer()} is closed ({conn.error or 'closed by the peer'})"
        )
