"""A NATS connection that carries whole socketengine frames.

Two flavours with the same operations:

* :class:`AsyncNatsLink`: coroutines, for use inside an asyncio program (every method
  must be awaited on the loop that connected it; callbacks run on that loop).
* :class:`NatsLink`: for threaded code.  It runs an :class:`AsyncNatsLink` on its own
  asyncio loop in one background thread (``socketengine-nats``); every method is
  thread-safe and blocks until the operation was handed to the NATS client.  Callbacks
  run on that thread and must be quick (hand the frame to a queue).

Bodies larger than the server's ``max_payload`` are chunked (:mod:`.chunks`) and put
back together before the callback sees them; a message that cannot be completed (a gap,
a timeout, messages the NATS client dropped for a slow subscriber) is reported through
``on_loss`` and logged, never hidden.  NATS keeps one publisher's order per subject, and
this link publishes under one lock, so frames arrive in the order they were published.

Errors: no server reachable within ``connect_timeout`` ->
:class:`~socketengine.errors.ConnectTimeout` (naming the URLs); the server refuses the
credentials -> :class:`~socketengine.errors.AuthenticationError`; a TLS mismatch (the
server requires TLS, or its certificate does not verify) ->
:class:`~socketengine.errors.HandshakeError` saying what to change; an operation after
:meth:`close` -> :class:`~socketengine.errors.EndpointClosed`; the reconnect buffer is
full while the link is reconnecting -> :class:`~socketengine.errors.ConnectionClosed`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import ssl
import threading
from typing import (
    Any,
    Awaitable,
    Callable,
    Coroutine,
    List,
    Optional,
    Sequence,
    TypeVar,
    Union,
)

from ... import codec, frames
from ...errors import (
    AuthenticationError,
    ConnectionClosed,
    ConnectTimeout,
    EndpointClosed,
    HandshakeError,
    MessageTooBig,
    SocketEngineError,
    WriteTimeout,
)
from .chunks import Chunker, Loss, Reassembler

__all__ = ["AsyncNatsLink", "NatsLink", "Subscription", "NoResponders", "Body"]

log = logging.getLogger("socketengine")

T = TypeVar("T")
Body = Union[codec.Buffer, Sequence[codec.Buffer]]
#: ``callback(subject, body)``: body is ``bytes`` (one NATS message) or a writable
#: ``bytearray`` (reassembled from chunks).
Callback = Callable[[str, Any], None]
LossCallback = Callable[[Loss], None]
StateCallback = Callable[[str], None]


class NoResponders(SocketEngineError, LookupError):
    """A request found nobody subscribed to its subject."""


def _join(body: Body) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body) if type(body) is not bytes else body
    if len(body) == 1 and type(body[0]) is bytes:
        return body[0]
    return b"".join(body)


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        type(exc).__name__ == "AuthorizationError"
        or "authorization violation" in text
        or "authentication" in text
    )


def _tls_problem(exc: BaseException) -> Optional[str]:
    """What to tell the user when ``exc`` is a TLS mismatch, else ``None``."""
    name = type(exc).__name__
    if name == "SecureConnRequiredError":
        return "the NATS server requires TLS: pass tls=ssl.SSLContext(...)"
    if name == "SecureConnWantedError":
        return "the NATS server does not offer TLS: connect without tls="
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return (
            "the NATS server's TLS certificate did not verify: pass "
            "tls=ssl.create_default_context(cafile=<its CA>) and check tls_hostname "
            f"({exc})"
        )
    return None


def _redact(url: str) -> str:
    """A server URL without credentials, for messages and logs."""
    if "@" in url:
        scheme, _, rest = url.rpartition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}" if scheme else url
    return url


class Subscription:
    """A subscription made with ``subscribe``; :meth:`unsubscribe` ends it."""

    def __init__(self, link: Any, subject: str, sub: Any, reassembler: Reassembler) -> None:
        self.subject = subject
        self._link = link
        self._sub = sub
        self.reassembler = reassembler

    async def _unsubscribe(self) -> None:
        self._link._subs.discard(self)
        self.reassembler.drop_source_all()
        await self._sub.unsubscribe()

    def unsubscribe(self) -> Any:
        """End the subscription (a coroutine for the asyncio link; blocking for NatsLink)."""
        if isinstance(self._link, AsyncNatsLink) and self._link._owner is not None:
            return self._link._owner.run(self._unsubscribe())
        return self._unsubscribe()


class AsyncNatsLink:
    """A NATS connection for socketengine frames, for asyncio programs.

    :param max_message: largest body accepted (sent or reassembled), bytes.
    :param chunk_timeout: an incomplete chunked message is dropped (and reported) after
        this many seconds without a new chunk.
    :param reconnect_buffer: bytes the NATS client buffers while reconnecting (publishes
        beyond raise :class:`ConnectionClosed`).
    :param on_loss: called with each :class:`~.chunks.Loss` (on the link's loop).
    :param on_state: called with ``"disconnected"``, ``"reconnected"``, ``"closed"``.
    """

    def __init__(
        self,
        *,
        max_message: int = frames.DEFAULT_MAX_MESSAGE,
        chunk_timeout: float = 10.0,
        reconnect_buffer: int = 32 * 1024 * 1024,
        on_loss: Optional[LossCallback] = None,
        on_state: Optional[StateCallback] = None,
    ) -> None:
        self.max_message = max_message
        self.chunk_timeout = chunk_timeout
        self.reconnect_buffer = reconnect_buffer
        self.on_loss = on_loss
        self.on_state = on_state
        self.losses = 0  # messages reported lost so far
        self.servers: List[str] = []
        self._nc: Any = None
        self._chunker: Optional[Chunker] = None
        self._lock: Optional[asyncio.Lock] = None
        self._subs: set = set()
        self._sweeper: Optional[asyncio.Task] = None
        self._closed = False
        self._owner: Optional[NatsLink] = None  # set when run by a NatsLink

    # -- state ------------------------------------------------------------------------

    @property
    def nc(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (for JetStream: ``nc.jetstream()``)."""
        if self._nc is None:
            if self._closed:
                raise EndpointClosed("the NATS link is closed; create a new one")
            raise ConnectionClosed("the NATS link is not connected: call connect() first")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The server's largest NATS message, bytes (chunks are at most this large)."""
        return int(self.nc.max_payload)

    @property
    def connected_url(self) -> Optional[str]:
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        return _redact(url.geturl()) if url is not None else None

    # -- connect ------------------------------------------------------------------------

    async def connect(
        self,
        servers: Union[str, Sequence[str]],
        *,
        name: Optional[str] = None,
        token: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        tls: Optional[ssl.SSLContext] = None,
        tls_hostname: Optional[str] = None,
        connect_timeout: float = 5.0,
        reconnect_wait: float = 0.25,
        ping_interval: float = 5.0,
        max_outstanding_pings: int = 2,
    ) -> None:
        """Connect to the first server that accepts, trying for ``connect_timeout`` s.

        After that the link reconnects by itself, forever, to any server of the cluster
        (``reconnect_wait`` s between attempts on one server); a dead server is noticed
        by the TCP connection closing, or after ``ping_interval * (max_outstanding_pings
        + 1)`` s without answers.
        """
        import nats  # optional dependency: pip install "socket.engine[nats]"

        if self._closed:
            raise EndpointClosed("the NATS link is closed; create a new one")
        if self._nc is not None:
            raise RuntimeError("the NATS link is already connected")
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls:
            raise ValueError("servers is empty: pass at least one nats:// URL")
        self.servers = urls
        shown = ", ".join(_redact(u) for u in urls)
        loop = asyncio.get_running_loop()
        auth_error: List[BaseException] = []
        tls_error: List[str] = []
        last_error: List[BaseException] = []
        task: Optional[asyncio.Future] = None

        async def error_cb(exc: Exception) -> None:
            if self._nc is None:  # still connecting
                last_error[:] = [exc]
                if task is None or auth_error or tls_error:
                    return
                if _is_auth_error(exc):
                    auth_error.append(exc)
                    task.cancel()
                elif _tls_problem(exc) is not None:
                    tls_error.append(f"{_tls_problem(exc)}")
                    task.cancel()
                return
            self._on_error(exc)

        async def disconnected_cb() -> None:
            if self._nc is not None and not self._closed:
                log.warning("NATS link %s: disconnected, reconnecting", name or "")
                self._state("disconnected")

        async def reconnected_cb() -> None:
            log.info("NATS link %s: reconnected to %s", name or "", self.connected_url)
            self._state("reconnected")

        async def closed_cb() -> None:
            self._state("closed")

        nc = nats.NATS()
        kwargs: dict = {}
        if tls is not None:
            kwargs["tls"] = tls
        if tls_hostname is not None:
            kwargs["tls_hostname"] = tls_hostname
        task = loop.create_task(
            nc.connect(
                servers=urls,
                name=name,
                token=token,
                user=user,
                password=password,
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                closed_cb=closed_cb,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=reconnect_wait,  # type: ignore[arg-type]
                connect_timeout=max(1, math.ceil(connect_timeout)),
                ping_interval=ping_interval,  # type: ignore[arg-type]
                max_outstanding_pings=max_outstanding_pings,
                pending_size=self.reconnect_buffer,
                **kwargs,
            )
        )
        try:
            await asyncio.wait_for(task, connect_timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError, Exception) as exc:
            await self._discard(nc)
            if auth_error:
                raise AuthenticationError(
                    f"the NATS server at {shown} refused the credentials "
                    f"({auth_error[0]}): check token / user / password"
                ) from None
            problem = tls_error[0] if tls_error else _tls_problem(exc)
            if problem is not None:
                raise HandshakeError(f"connecting to NATS at {shown}: {problem}") from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            if isinstance(exc, asyncio.TimeoutError):
                why = f" (last error: {last_error[0]})" if last_error else ""
                raise ConnectTimeout(
                    f"no NATS server of {shown} accepted a connection within "
                    f"{connect_timeout} s{why}: is the cluster running and reachable?"
                ) from None
            if _is_auth_error(exc):
                raise AuthenticationError(
                    f"the NATS server at {shown} refused the credentials ({exc})"
                ) from None
            raise ConnectionClosed(f"connecting to NATS at {shown} failed: {exc}") from exc
        self._nc = nc
        self._chunker = Chunker(int(nc.max_payload))
        self._lock = asyncio.Lock()
        self._sweeper = loop.create_task(self._sweep())
        log.info("NATS link %s: connected to %s", name or "", self.connected_url)

    @staticmethod
    async def _discard(nc: Any) -> None:
        try:
            await asyncio.wait_for(nc.close(), 2.0)
        except BaseException:  # noqa: BLE001 (a half-made client: nothing to keep)
            pass

    # -- publish / subscribe ----------------------------------------------------------

    async def publish(self, subject: str, body: Body) -> None:
        """Publish one frame (its parts or its bytes), chunked if above max_payload."""
        await self._publish(subject, _join(body))

    async def _publish(self, subject: str, data: bytes) -> None:
        nc = self.nc
        if len(data) > self.max_message:
            raise MessageTooBig(
                f"a {len(data)}-byte frame exceeds max_message ({self.max_message} bytes)"
            )
        assert self._chunker is not None and self._lock is not None
        msgs = self._chunker.split(data)
        import nats.errors as nerr

        try:
            async with self._lock:
                for m in msgs:
                    await nc.publish(subject, m)
        except nerr.OutboundBufferLimitError:
            raise ConnectionClosed(
                f"the NATS link is reconnecting and its buffer ({self.reconnect_buffer} "
                "bytes) is full: the frame was not sent; retry when it is back"
            ) from None
        except nerr.ConnectionClosedError:
            raise EndpointClosed("the NATS link is closed; create a new one") from None

    async def subscribe(self, subject: str, callback: Callback, queue: str = "") -> Subscription:
        """Call ``callback(subject, body)`` for each whole frame published on ``subject``.

        Bodies arrive in publish order per publisher and subject.  ``queue`` makes this a
        queue subscription (each message goes to one member of the group).
        """
        nc = self.nc
        reasm = Reassembler(self.max_message, timeout=self.chunk_timeout)

        async def on_msg(msg: Any) -> None:
            body = reasm.feed(msg.subject, msg.data)
            if reasm.losses:
                for loss in reasm.take_losses():
                    self._report(loss)
            if body is not None:
                try:
                    callback(msg.subject, body)
                except Exception:
                    log.exception("NATS link: the callback for %r raised", subject)

        sub = await nc.subscribe(
            subject,
            queue=queue,
            cb=on_msg,
            pending_bytes_limit=max(4 * self.max_message, 128 * 1024 * 1024),
        )
        s = Subscription(self, subject, sub, reasm)
        self._subs.add(s)
        return s

    async def request(self, subject: str, body: Body, timeout: float = 5.0) -> bytes:
        """Send one body (at most ``max_payload``) and wait for one reply."""
        nc = self.nc
        data = _join(body)
        if len(data) > nc.max_payload:
            raise MessageTooBig(
                f"a request is one NATS message: {len(data)} bytes > max_payload {nc.max_payload}"
            )
        import nats.errors as nerr

        try:
            msg = await nc.request(subject, data, timeout=timeout)
        except nerr.NoRespondersError:
            raise NoResponders(f"nobody answers requests on {subject!r}") from None
        except nerr.TimeoutError:
            raise TimeoutError(f"no reply on {subject!r} within {timeout} s") from None
        return bytes(msg.data)

    async def serve(
        self, subject: str, handler: Callable[[bytes], Union[bytes, Awaitable[bytes]]]
    ) -> Subscription:
        """Answer requests on ``subject`` with ``handler(body)`` (its result is the reply)."""
        nc = self.nc

        async def on_msg(msg: Any) -> None:
            try:
                reply = handler(msg.data)
                if asyncio.iscoroutine(reply) or isinstance(reply, asyncio.Future):
                    reply = await reply
                if msg.reply:
                    await msg.respond(reply)
            except Exception:
                log.exception("NATS link: the request handler for %r raised", subject)

        sub = await nc.subscribe(subject, cb=on_msg)
        s = Subscription(self, subject, sub, Reassembler(1))
        self._subs.add(s)
        return s

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed everything published so far."""
        await self.nc.flush(timeout=max(1, math.ceil(timeout)))

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is in flight (drain), then close.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        nc, self._nc = self._nc, None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.drain(), timeout)
        except Exception as exc:  # noqa: BLE001 (closing: report and close regardless)
            log.debug("NATS link: drain failed (%s); closing", exc)
        if not nc.is_closed:
            await self._discard(nc)
        for s in list(self._subs):
            s.reassembler.drop_source_all()
            for loss in s.reassembler.take_losses():
                self._report(loss)
        self._subs.clear()

    # -- internals ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        period = max(0.05, self.chunk_timeout / 4)
        while True:
            await asyncio.sleep(period)  # a periodic timer, not synchronisation
            for s in list(self._subs):
                r = s.reassembler
                if r.pending_bytes:
                    r.expire()
                    for loss in r.take_losses():
                        self._report(loss)

    def _report(self, loss: Loss) -> None:
        self.losses += 1
        log.warning(
            "NATS link: message %d from sender %x on %s lost (%d of %d chunks): %s",
            loss.message_id,
            loss.sender,
            loss.source,
            loss.received,
            loss.chunks,
            loss.reason,
        )
        if self.on_loss is not None:
            try:
                self.on_loss(loss)
            except Exception:
                log.exception("NATS link: on_loss raised")

    def _on_error(self, exc: Exception) -> None:
        if type(exc).__name__ == "SlowConsumerError":
            subject = str(getattr(exc, "subject", "?"))
            self._report(Loss(subject, 0, 0, 0, 0, "slow consumer: the NATS client dropped it"))
            return
        log.warning("NATS link: %s", exc)

    def _state(self, state: str) -> None:
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("NATS link: on_state raised")


class NatsLink:
    """A NATS link for threaded code: an :class:`AsyncNatsLink` on its own loop thread.

    Takes the same constructor arguments as :class:`AsyncNatsLink`.  Every method is
    thread-safe.  Called from the link's own thread (inside a callback), ``publish``
    does not wait (it cannot: the thread would wait for itself); other blocking calls
    raise ``RuntimeError`` there.
    """

    def __init__(self, *, max_queue: int = 64 * 1024 * 1024, **kwargs: Any) -> None:
        self.aio = AsyncNatsLink(**kwargs)
        self.aio._owner = self
        #: bytes :meth:`publish_nowait` may have queued before it blocks.
        self.max_queue = max_queue
        self.send_failures = 0  # publish_nowait frames that could not be sent
        self._queued = 0
        self._cv = threading.Condition()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()

    # -- plumbing ---------------------------------------------------------------------

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._started.set()
            try:
                loop.run_forever()
            finally:
                try:
                    pending = asyncio.all_tasks(loop)
                    for t in pending:
                        t.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name="socketengine-nats", daemon=True)
        self._thread.start()
        self._started.wait()
        return loop

    def _on_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
        """Run ``coro`` on the link's loop and return its result (blocking)."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise EndpointClosed("the NATS link is not running: connect() it (again)")
        if self._on_loop_thread():
            coro.close()
            raise RuntimeError(
                "a blocking NatsLink call from the link's own thread (a callback) would "
                "wait for itself: hand the work to another thread"
            )
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        done, _ = concurrent.futures.wait([fut], timeout)
        if not done:
            fut.cancel()
            raise TimeoutError(f"the NATS link did not finish within {timeout} s")
        return fut.result()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("NATS link: publish from a callback failed: %s", t.exception())

        task.add_done_callback(done)

    # -- the API ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.aio.connected

    @property
    def max_payload(self) -> int:
        return self.aio.max_payload

    @property
    def connected_url(self) -> Optional[str]:
        return self.aio.connected_url

    @property
    def losses(self) -> int:
        return self.aio.losses

    def connect(self, servers: Union[str, Sequence[str]], **kwargs: Any) -> None:
        """See :meth:`AsyncNatsLink.connect` (same arguments); blocks until connected."""
        self._start()
        timeout = float(kwargs.get("connect_timeout", 5.0))
        try:
            self.run(self.aio.connect(servers, **kwargs), timeout + 10.0)
        except BaseException:
            self._stop()
            raise

    def publish(self, subject: str, body: Body, timeout: Optional[float] = 30.0) -> None:
        """Publish one frame; blocks until the NATS client has taken it."""
        data = _join(body)  # copied here: the caller may reuse its buffers at once
        if self._on_loop_thread():
            self._spawn(self.aio._publish(subject, data))
            return
        self.run(self.aio._publish(subject, data), timeout)

    def publish_nowait(self, subject: str, body: Body, timeout: Optional[float] = 30.0) -> None:
        """Queue one frame for publishing and return at once (the fast path).

        Frames keep their order (with each other and with :meth:`publish`).  At most
        ``max_queue`` bytes wait on the link thread; beyond, this blocks up to ``timeout``
        s, then raises :class:`~socketengine.errors.WriteTimeout` (nothing queued).  A
        frame that fails later (the link closed, the reconnect buffer full) is logged and
        counted in :attr:`send_failures`; :meth:`flush` then waits for the queue.
        """
        data = _join(body)
        if len(data) > self.aio.max_message:
            raise MessageTooBig(
                f"a {len(data)}-byte frame exceeds max_message ({self.aio.max_message} bytes)"
            )
        loop = self._loop
        if loop is None or self.aio._closed:
            raise EndpointClosed("the NATS link is not running: connect() it (again)")
        n = len(data)
        with self._cv:
            if self._queued + n > self.max_queue and self._queued and not self._on_loop_thread():
                if not self._cv.wait_for(
                    lambda: self._queued + n <= self.max_queue or not self._queued, timeout
                ):
                    raise WriteTimeout(
                        f"the NATS link kept {self._queued} bytes queued for {timeout} s: "
                        "the network or the server is not taking frames fast enough"
                    )
            self._queued += n
        loop.call_soon_threadsafe(self._send_later, subject, data)

    def _send_later(self, subject: str, data: bytes) -> None:
        """On the loop: start publishing ``data`` (tasks start, and take the publish
        lock, in the order they were created)."""
        task = asyncio.ensure_future(self.aio._publish(subject, data))
        n = len(data)

        def done(t: asyncio.Task) -> None:
            with self._cv:
                self._queued -= n
                self._cv.notify_all()
            if t.cancelled() or t.exception() is not None:
                self.send_failures += 1
                why = "cancelled" if t.cancelled() else t.exception()
                log.error("NATS link: a frame on %s was not sent: %s", subject, why)

        task.add_done_callback(done)

    def subscribe(self, subject: str, callback: Callback, queue: str = "") -> Subscription:
        """See :meth:`AsyncNatsLink.subscribe`; ``callback`` runs on the link thread."""
        return self.run(self.aio.subscribe(subject, callback, queue), 10.0)

    def request(self, subject: str, body: Body, timeout: float = 5.0) -> bytes:
        return self.run(self.aio.request(subject, body, timeout), timeout + 5.0)

    def serve(self, subject: str, handler: Callable[[bytes], bytes]) -> Subscription:
        return self.run(self.aio.serve(subject, handler), 10.0)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until frames queued by :meth:`publish_nowait` are handed over and the
        server has processed everything published so far."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._queued == 0, timeout):
                raise TimeoutError(f"{self._queued} queued bytes were not sent within {timeout} s")
        self.run(self.aio.flush(timeout), timeout + 5.0)

    def close(self, timeout: float = 5.0) -> None:
        """Drain and close, then stop the thread.  Idempotent."""
        if self._loop is None:
            self.aio._closed = True
            return
        try:
            if self._thread is not None and self._thread.is_alive():
                self.run(self.aio.close(timeout), timeout + 5.0)
        finally:
            self._stop()

    def _stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            if not self._on_loop_thread():
                thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> NatsLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
