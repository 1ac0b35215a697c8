"""Retained values in JetStream, so that a client joining later gets them.

One key-value bucket per host (``<prefix>_retained_<host>``, history 1, ``replicas``
copies: 3 on a 3-node cluster, so a value survives the death of the server that took
it).  The key is the channel's subject token (:func:`.subjects.encode_token`), the value
the frame's wire bytes.  Reads use JetStream *direct get*, which any replica answers, so
they keep working while a new stream leader is elected after a server died.

A KV value is one NATS message, so values up to ``inline_max`` (default: the server's
``max_payload`` minus 4 KiB for headers) are stored inline.  A larger one (a 6 MB image)
is split over the keys ``<key>.0``, ``<key>.1``, ... of the same bucket (each value:
8-byte write id + piece), written first, and the key itself then gets a *manifest*:
``b"\xc6SEKV1"`` + ``<QIQ`` (write id, piece count, total size).  A frame never starts
with 0xC6, so a manifest cannot be mistaken for a value.  A reader checks every piece's
write id against the manifest and reads again if a writer was overwriting the value
meanwhile.  The key ``=channels`` (no token has ``=``) lists the channel keys, so that
:meth:`~AsyncRetainedStore.channels` is a direct get too; one writer per host bucket (the
host) keeps it.  (Why not the JetStream object store: its reads need the stream leader, and
after the leader's server died they waited 6.7 s for the election in our measurement.)

:class:`AsyncRetainedStore` is for asyncio code (an :class:`AsyncNatsLink`);
:class:`RetainedStore` wraps it for threaded code (a :class:`NatsLink`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, TypeVar

import msgpack

from ...errors import ProtocolError, SocketEngineError
from .link import AsyncNatsLink, NatsLink
from .subjects import DEFAULT_PREFIX, bucket_name, decode_token, encode_token

__all__ = ["AsyncRetainedStore", "RetainedStore", "RetainedUnavailable", "POINTER"]

log = logging.getLogger("socketengine")

T = TypeVar("T")

POINTER = b"\xc6SEKV1"
_MANIFEST = struct.Struct("<QIQ")
#: The key listing the channel keys of a bucket (msgpack list); "=" is no token character.
DIRECTORY_KEY = "=channels"
_WID = struct.Struct("<Q")


def _parse_manifest(raw: Optional[bytes]) -> Optional[tuple]:
    if raw is None or raw[: len(POINTER)] != POINTER:
        return None
    if len(raw) != len(POINTER) + _MANIFEST.size:
        raise ProtocolError(f"malformed retained-value manifest ({len(raw)} bytes)")
    return _MANIFEST.unpack_from(raw, len(POINTER))


def _directory(raw: Optional[bytes]) -> List[str]:
    if not raw:
        return []
    try:
        keys = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise ProtocolError(f"malformed retained-value directory: {exc}") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError("malformed retained-value directory: not a list of keys")
    return keys


class RetainedUnavailable(SocketEngineError):
    """JetStream did not answer in time (no quorum, or a leader election under way)."""


def jetstream_transient(exc: BaseException) -> bool:
    """``exc`` is JetStream not answering for a moment (a leader election, a stream just
    created, a reconnection): worth retrying within a deadline."""
    import nats.errors as nerr
    import nats.js.errors as jerr

    return isinstance(
        exc,
        (
            nerr.TimeoutError,
            nerr.NoRespondersError,
            jerr.ServiceUnavailableError,
            jerr.ServerError,
            asyncio.TimeoutError,
            nerr.ConnectionReconnectingError,
            jerr.NoStreamResponseError,  # a put while the stream elects a leader
        ),
    )


async def retry_transient(
    op: Callable[[], Awaitable[T]],
    seconds: float,
    retryable: Callable[[BaseException], bool] = jetstream_transient,
) -> T:
    """Await ``op()``; while it fails with an error ``retryable`` accepts (by default
    :func:`jetstream_transient`) and ``seconds`` have not passed, try again every 0.1 s.
    Then the last error is raised as is (the caller may translate it); any other error
    is raised at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await op()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() >= deadline:
                raise
            log.debug("JetStream busy (%r); retrying", exc)
        await asyncio.sleep(0.1)  # JetStream electing a leader, or hearing from a server


#: JetStream's error code for "no suitable peers for placement".
NO_PLACEMENT = 10005


def placement_pending(exc: BaseException) -> bool:
    """``exc`` is JetStream refusing to place a new stream because it counts a server as
    offline, as its meta leader may for a moment after a server restarted, until it
    hears from it again."""
    import nats.js.errors as jerr

    return (
        isinstance(exc, jerr.BadRequestError)
        and exc.err_code == NO_PLACEMENT
        and "offline" in str(exc.description or "").lower()
    )


async def create_bucket_kv(js: Any, replicas: int, wait: float = 10.0, **config: Any) -> Any:
    """Create (or bind to) a KV bucket with ``replicas`` copies, or 1 on a single server.

    While JetStream refuses to place it because a server is offline
    (:func:`placement_pending`), try again every 0.1 s for ``wait`` seconds, then raise
    that refusal (``nats.js.errors.BadRequestError``)."""
    return await retry_transient(
        lambda: _create_bucket_kv_once(js, replicas, **config), wait, placement_pending
    )


async def _create_bucket_kv_once(js: Any, replicas: int, **config: Any) -> Any:
    import nats.js.errors as jerr
    from nats.js.api import KeyValueConfig

    try:
        return await js.create_key_value(KeyValueConfig(replicas=replicas, **config))
    except jerr.BadRequestError as exc:
        if replicas > 1 and "replicas" in str(exc).lower():
            log.warning("JetStream refused %d replicas (%s): using 1", replicas, exc)
            return await js.create_key_value(KeyValueConfig(replicas=1, **config))
        if "already in use" in str(exc).lower() or "exists" in str(exc).lower():
            return await js.key_value(config["bucket"])
        raise


class AsyncRetainedStore:
    """Retained frames of ``host`` in JetStream (asyncio).  Call :meth:`open` first.

    :param replicas: copies of every value (3 survives one dead server of three).
    :param timeout: how long an operation retries while JetStream elects a new leader
        after a server died, before :class:`RetainedUnavailable`.
    :param request_timeout: seconds one JetStream API request may take before it is
        retried (a request routed to a server that just died is only noticed this way).
    """

    def __init__(
        self,
        link: AsyncNatsLink,
        host: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        replicas: int = 3,
        inline_max: Optional[int] = None,
        timeout: float = 10.0,
        request_timeout: float = 1.0,
    ) -> None:
        self.link = link
        self.request_timeout = request_timeout
        self.host = host
        self.replicas = replicas
        self.timeout = timeout
        self.kv_bucket = bucket_name(prefix, "retained", host)
        self._inline_max = inline_max
        self._kv: Any = None
        self._pieces: Dict[str, int] = {}  # key -> piece count, for keys this store wrote
        self._directory: Optional[List[str]] = None  # keys with a value (this store's view)

    @property
    def inline_max(self) -> int:
        if self._inline_max is not None:
            return self._inline_max
        return max(1024, self.link.max_payload - 4096)

    def _js(self) -> Any:
        return self.link.nc.jetstream(timeout=self.request_timeout)

    async def open(self) -> AsyncRetainedStore:
        """Create the bucket, or bind to it.  If JetStream's meta leader is being elected
        (a server just died), bind without asking it: reads work at once (direct get from
        any replica), writes retry until the stream has a leader."""
        from nats.js.kv import KeyValue

        js = self._js()
        try:
            self._kv = await create_bucket_kv(
                js, self.replicas, self.timeout, bucket=self.kv_bucket, history=1, direct=True
            )
        except Exception as exc:
            if not jetstream_transient(exc):
                raise
            log.info("retained store %r: JetStream busy (%r), binding directly", self.host, exc)
            b = self.kv_bucket
            self._kv = KeyValue(name=b, stream=f"KV_{b}", pre=f"$KV.{b}.", js=js, direct=True)
        return self

    async def _retry(self, op: Any) -> Any:
        try:
            return await retry_transient(op, self.timeout)
        except Exception as exc:
            if not jetstream_transient(exc):
                raise
            raise RetainedUnavailable(
                f"JetStream did not answer within {self.timeout} s ({exc!r}): is a "
                "majority of the NATS servers up?"
            ) from None

    def _kv_or_raise(self) -> Any:
        if self._kv is None:
            raise RuntimeError("call open() on the retained store first")
        return self._kv

    async def _pieces_of(self, key: str) -> int:
        """How many piece keys the current value of ``key`` uses (0 if inline/none)."""
        known = self._pieces.get(key)
        if known is not None:
            return known
        raw = await self._raw(key)
        m = _parse_manifest(raw)
        return m[1] if m is not None else 0

    async def _raw(self, key: str) -> Optional[bytes]:
        import nats.js.errors as jerr

        kv = self._kv_or_raise()

        async def get() -> Optional[bytes]:
            try:
                entry = await kv.get(key)
            except (jerr.KeyNotFoundError, jerr.KeyDeletedError):
                return None
            return bytes(entry.value) if entry.value is not None else None

        result: Optional[bytes] = await self._retry(get)
        return result

    async def put(self, channel: str, body: bytes) -> None:
        """Retain ``body`` (a frame's bytes) for ``channel``, replacing the previous value."""
        kv = self._kv_or_raise()
        key = encode_token(channel, "channel name")
        old = await self._pieces_of(key)
        size = self.inline_max - _WID.size
        count = 0
        if len(body) > self.inline_max:
            wid = int.from_bytes(os.urandom(8), "little")
            head = _WID.pack(wid)
            mv = memoryview(body)
            count = -(-len(body) // size)
            await asyncio.gather(
                *(
                    self._retry(
                        lambda i=i: kv.put(f"{key}.{i}", head + mv[i * size : (i + 1) * size])
                    )
                    for i in range(count)
                )
            )
            value = POINTER + _MANIFEST.pack(wid, count, len(body))
        else:
            value = bytes(body)
        directory = await self._load_directory()
        await self._retry(lambda: kv.put(key, value))
        self._pieces[key] = count
        if key not in directory:
            await self._set_directory([*directory, key])
        await self._drop_pieces(key, count, old)

    async def _drop_pieces(self, key: str, start: int, stop: int) -> None:
        kv = self._kv_or_raise()
        if stop > start:
            await asyncio.gather(
                *(self._retry(lambda i=i: kv.delete(f"{key}.{i}")) for i in range(start, stop))
            )

    async def get(self, channel: str) -> Optional[bytes]:
        """The retained frame bytes of ``channel``, or ``None``."""
        key = encode_token(channel, "channel name")
        for _ in range(5):
            raw = await self._raw(key)
            m = _parse_manifest(raw)
            if m is None:
                return raw
            wid, count, total = m
            if total > self.link.max_message:
                raise ProtocolError(
                    f"retained value of {channel!r} is {total} bytes > max_message "
                    f"{self.link.max_message}"
                )
            pieces = await asyncio.gather(*(self._raw(f"{key}.{i}") for i in range(count)))
            head = _WID.pack(wid)
            if all(p is not None and p[:8] == head for p in pieces):
                out = b"".join(memoryview(p)[8:] for p in pieces if p is not None)
                if len(out) == total:
                    return out
            # A writer replaced the value between our reads: read it again.
        raise RetainedUnavailable(f"the retained value of {channel!r} kept changing while read")

    async def delete(self, channel: str) -> None:
        """Forget the retained value of ``channel`` (no error if there is none)."""
        kv = self._kv_or_raise()
        key = encode_token(channel, "channel name")
        old = await self._pieces_of(key)
        await self._retry(lambda: kv.delete(key))
        self._pieces[key] = 0
        directory = await self._load_directory()
        if key in directory:
            await self._set_directory([k for k in directory if k != key])
        await self._drop_pieces(key, 0, old)

    async def _load_directory(self) -> List[str]:
        if self._directory is None:
            self._directory = _directory(await self._raw(DIRECTORY_KEY))
        return self._directory

    async def _set_directory(self, keys: List[str]) -> None:
        kv = self._kv_or_raise()
        body = msgpack.packb(sorted(keys))
        await self._retry(lambda: kv.put(DIRECTORY_KEY, body))
        self._directory = sorted(keys)

    async def channels(self) -> List[str]:
        """Channels that have a retained value.

        Read from the bucket's directory key (a direct get: works while a new stream
        leader is being elected); keys whose value is gone are left out.
        """
        raw = await self._raw(DIRECTORY_KEY)  # read fresh: another store may have written
        keys = _directory(raw)
        values = await asyncio.gather(*(self._raw(k) for k in keys))
        return sorted(decode_token(k) for k, v in zip(keys, values) if v is not None)

    async def items(self) -> Dict[str, bytes]:
        """Every retained value: what a client joining late receives."""
        out: Dict[str, bytes] = {}
        for channel in await self.channels():
            body = await self.get(channel)
            if body is not None:
                out[channel] = body
        return out

    async def destroy(self) -> None:
        """Delete this host's bucket (every retained value)."""
        import nats.js.errors as jerr

        js = self._js()
        try:
            await self._retry(lambda: js.delete_key_value(self.kv_bucket))
        except jerr.NotFoundError:
            pass
        self._kv = None
        self._pieces.clear()
        self._directory = None


class RetainedStore:
    """:class:`AsyncRetainedStore` for threaded code (same methods, blocking)."""

    def __init__(self, link: NatsLink, host: str, **kwargs: Any) -> None:
        self.link = link
        self.aio = AsyncRetainedStore(link.aio, host, **kwargs)
        self._limit = self.aio.timeout * 3 + 10.0
        link.run(self.aio.open(), self._limit)

    def put(self, channel: str, body: bytes) -> None:
        self.link.run(self.aio.put(channel, body), self._limit)

    def get(self, channel: str) -> Optional[bytes]:
        return self.link.run(self.aio.get(channel), self._limit)

    def delete(self, channel: str) -> None:
        self.link.run(self.aio.delete(channel), self._limit)

    def channels(self) -> List[str]:
        return self.link.run(self.aio.channels(), self._limit)

    def items(self) -> Dict[str, bytes]:
        return self.link.run(self.aio.items(), self._limit)

    def destroy(self) -> None:
        self.link.run(self.aio.destroy(), self._limit)
