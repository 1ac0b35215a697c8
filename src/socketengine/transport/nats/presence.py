"""Who is there: hosts on a cluster, clients of a host.

**Hosts** announce themselves in one JetStream key-value bucket shared by all hosts of a
prefix (``<prefix>_hosts``, entries expire ``ttl`` seconds after their last write;
:class:`AsyncHostAnnouncer` rewrites its entry every ``ttl / 3`` s and deletes it on
:meth:`~AsyncHostAnnouncer.stop`).  :func:`list_hosts` lists them in one call.  A host
that dies without stopping disappears within ``ttl`` s (plus JetStream's expiry sweep,
about a second).  The bucket's ``ttl`` is set by whoever creates it first (default 10 s).

**Clients** send heartbeats (core NATS, not stored) on ``P.h.H.p.C`` every ``interval``
seconds and a goodbye when they stop (:class:`AsyncClientHeartbeat`).  A host runs an
:class:`AsyncPresenceMonitor`: ``on_join(client)`` at the first heartbeat,
``on_leave(client, reason)`` at a goodbye (``"goodbye"``) or when no heartbeat came for
``timeout`` seconds (``"timeout"``).  **Bound**: a client that vanishes without goodbye
(killed, network cut) is reported gone at most ``timeout + timeout / 4`` seconds after
its last heartbeat reached the host; defaults ``interval=1``, ``timeout=3``: within
3.75 s.  :class:`PresenceTable` is the sans-I/O core of the monitor.

Heartbeat bodies are msgpack maps ``{"e": "hb" | "bye", "i": interval}``, not frames.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

import msgpack

from .link import AsyncNatsLink, NatsLink, Subscription
from .retained import create_bucket_kv, retry_transient
from .subjects import DEFAULT_PREFIX, Subjects, bucket_name, decode_token, encode_token

__all__ = [
    "PresenceTable",
    "AsyncHostAnnouncer",
    "AsyncClientHeartbeat",
    "AsyncPresenceMonitor",
    "HostAnnouncer",
    "ClientHeartbeat",
    "PresenceMonitor",
    "list_hosts",
    "alist_hosts",
]

log = logging.getLogger("socketengine")


class PresenceTable:
    """Last-seen times of clients (sans-I/O)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._seen: Dict[str, float] = {}

    @property
    def clients(self) -> List[str]:
        return sorted(self._seen)

    def beat(self, client: str, now: float) -> bool:
        """Record a heartbeat; ``True`` if the client is new."""
        new = client not in self._seen
        self._seen[client] = now
        return new

    def bye(self, client: str) -> bool:
        """A goodbye; ``True`` if the client was present."""
        return self._seen.pop(client, None) is not None

    def expire(self, now: float) -> List[str]:
        """Forget and return the clients silent for more than ``timeout`` s."""
        gone = [c for c, t in self._seen.items() if now - t > self.timeout]
        for c in gone:
            del self._seen[c]
        return gone


# -- hosts ----------------------------------------------------------------------------


#: Seconds a host's first announcement (and a listing) is retried while JetStream cannot
#: answer yet.
FIRST_ANNOUNCE = 10.0


async def _hosts_kv(link: AsyncNatsLink, prefix: str, ttl: float, replicas: int) -> Any:
    return await create_bucket_kv(
        link.nc.jetstream(),
        replicas,
        FIRST_ANNOUNCE,
        bucket=bucket_name(prefix, "hosts"),
        history=1,
        ttl=ttl,
        direct=True,
    )


class AsyncHostAnnouncer:
    """Keeps ``host`` listed in the hosts bucket while running (asyncio)."""

    def __init__(
        self,
        link: AsyncNatsLink,
        host: str,
        info: Optional[Dict[str, Any]] = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 10.0,
        replicas: int = 3,
    ) -> None:
        self.link = link
        self.host = host
        self.key = encode_token(host, "host name")
        self.info = dict(info or {})
        self.prefix = prefix
        self.ttl = ttl
        self.replicas = replicas
        self._kv: Any = None
        self._task: Optional[asyncio.Task] = None

    async def start(self, strict: bool = True) -> None:
        """Announce now and keep announcing.  ``strict=False``: a first announcement
        that fails (JetStream electing a leader after a server died) is logged and
        retried every period instead of raised."""
        # A bucket just created (or a server just restarted) has no stream leader for a
        # moment: its first put finds no responders.  Retried for FIRST_ANNOUNCE s.
        try:
            await retry_transient(self._announce, FIRST_ANNOUNCE)
        except Exception as exc:
            if strict:
                raise
            log.warning("host %r: announcement failed (%s); retrying", self.host, exc)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _announce(self) -> None:
        if self._kv is None:
            self._kv = await _hosts_kv(self.link, self.prefix, self.ttl, self.replicas)
        body = msgpack.packb({"name": self.host, "pid": os.getpid(), "t": time.time(), **self.info})
        await self._kv.put(self.key, body)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)  # the announcement period
            try:
                await self._announce()
            except Exception as exc:  # noqa: BLE001 (a failover: try again next period)
                log.warning("host %r: announcement failed (%s); retrying", self.host, exc)

    async def stop(self) -> None:
        """Stop announcing and remove the entry (others see the host gone at once)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._kv is not None:
            try:
                await self._kv.delete(self.key)
            except Exception as exc:  # noqa: BLE001 (closing: the TTL removes it anyway)
                log.debug("host %r: could not delete its announcement: %s", self.host, exc)
            self._kv = None


async def alist_hosts(
    link: AsyncNatsLink, *, prefix: str = DEFAULT_PREFIX, ttl: float = 10.0, replicas: int = 3
) -> Dict[str, Dict[str, Any]]:
    """Every announced host: ``{name: info}`` (one call; asyncio).  JetStream not
    answering for a moment (a stream electing its leader) is retried for
    :data:`FIRST_ANNOUNCE` s."""
    return await retry_transient(
        lambda: _list_hosts_once(link, prefix, ttl, replicas), FIRST_ANNOUNCE
    )


async def _list_hosts_once(
    link: AsyncNatsLink, prefix: str, ttl: float, replicas: int
) -> Dict[str, Dict[str, Any]]:
    import nats.js.errors as jerr

    kv = await _hosts_kv(link, prefix, ttl, replicas)
    try:
        keys = list(await kv.keys())
    except jerr.NoKeysError:
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except (jerr.KeyNotFoundError, jerr.KeyDeletedError):
            continue  # expired meanwhile
        if entry.value:
            out[decode_token(key)] = msgpack.unpackb(entry.value, raw=False)
    return out


# -- clients --------------------------------------------------------------------------


class AsyncClientHeartbeat:
    """Heartbeats of ``client`` to ``host`` every ``interval`` s (asyncio)."""

    def __init__(
        self,
        link: AsyncNatsLink,
        host: str,
        client: str,
        *,
        interval: float = 1.0,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.link = link
        self.subject = Subjects(prefix).presence(host, client)
        self.interval = interval
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        await self.link.publish(self.subject, msgpack.packb({"e": "hb", "i": self.interval}))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        body = msgpack.packb({"e": "hb", "i": self.interval})
        while True:
            await asyncio.sleep(self.interval)  # the heartbeat period
            try:
                await self.link.publish(self.subject, body)
            except Exception as exc:  # noqa: BLE001 (reconnecting: beat again next period)
                log.debug("heartbeat on %s failed: %s", self.subject, exc)

    async def stop(self, goodbye: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            if goodbye:
                await self.link.publish(self.subject, msgpack.packb({"e": "bye"}))


class AsyncPresenceMonitor:
    """Reports clients of ``host`` joining and leaving (asyncio; callbacks on the loop)."""

    def __init__(
        self,
        link: AsyncNatsLink,
        host: str,
        *,
        timeout: float = 3.0,
        on_join: Optional[Callable[[str], None]] = None,
        on_leave: Optional[Callable[[str, str], None]] = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.link = link
        self.subjects = Subjects(prefix)
        self.host = host
        self.table = PresenceTable(timeout)
        self.on_join = on_join
        self.on_leave = on_leave
        self._sub: Optional[Subscription] = None
        self._task: Optional[asyncio.Task] = None

    @property
    def clients(self) -> List[str]:
        return self.table.clients

    async def start(self) -> None:
        self._sub = await self.link.subscribe(
            self.subjects.presence_all(self.host), self._on_message
        )
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_message(self, subject: str, body: Any) -> None:
        try:
            client = self.subjects.parse(subject).name
            event = msgpack.unpackb(body, raw=False).get("e")
        except Exception:  # noqa: BLE001 (a stranger on our subject: ignore it, say so)
            log.warning("presence: malformed message on %s ignored", subject)
            return
        if event == "bye":
            if self.table.bye(client):
                self._call(self.on_leave, client, "goodbye")
        elif self.table.beat(client, time.monotonic()):
            self._call(self.on_join, client)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.table.timeout / 4)  # the expiry check period
            for client in self.table.expire(time.monotonic()):
                self._call(self.on_leave, client, "timeout")

    @staticmethod
    def _call(cb: Optional[Callable[..., None]], *args: str) -> None:
        if cb is not None:
            try:
                cb(*args)
            except Exception:
                log.exception("presence callback raised")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._sub is not None:
            await self._sub._unsubscribe()
            self._sub = None


# -- threaded wrappers ----------------------------------------------------------------


class HostAnnouncer:
    """:class:`AsyncHostAnnouncer` for a :class:`NatsLink` (starts at once)."""

    def __init__(
        self,
        link: NatsLink,
        host: str,
        info: Optional[Dict[str, Any]] = None,
        strict: bool = True,
        **kw: Any,
    ):
        self.link = link
        self.aio = AsyncHostAnnouncer(link.aio, host, info, **kw)
        link.run(self.aio.start(strict), 30.0)

    def stop(self) -> None:
        self.link.run(self.aio.stop(), 30.0)


def list_hosts(link: NatsLink, **kw: Any) -> Dict[str, Dict[str, Any]]:
    """Every announced host: ``{name: info}`` (one call)."""
    return link.run(alist_hosts(link.aio, **kw), 30.0)


class ClientHeartbeat:
    """:class:`AsyncClientHeartbeat` for a :class:`NatsLink` (starts at once)."""

    def __init__(self, link: NatsLink, host: str, client: str, **kw: Any) -> None:
        self.link = link
        self.aio = AsyncClientHeartbeat(link.aio, host, client, **kw)
        link.run(self.aio.start(), 30.0)

    def stop(self, goodbye: bool = True) -> None:
        self.link.run(self.aio.stop(goodbye), 30.0)


class PresenceMonitor:
    """:class:`AsyncPresenceMonitor` for a :class:`NatsLink` (starts at once; callbacks
    run on the link thread)."""

    def __init__(self, link: NatsLink, host: str, **kw: Any) -> None:
        self.link = link
        self.aio = AsyncPresenceMonitor(link.aio, host, **kw)
        link.run(self.aio.start(), 30.0)

    @property
    def clients(self) -> List[str]:
        """The clients present now (read on the link thread)."""

        async def clients() -> List[str]:
            return self.aio.clients

        return self.link.run(clients(), 10.0)

    def stop(self) -> None:
        self.link.run(self.aio.stop(), 30.0)
