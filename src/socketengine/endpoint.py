"""What every endpoint has, whichever its I/O layer: validated settings, the latest
value per channel, image bookkeeping and stats.

``socketengine.Host``/``Client`` (threaded) and ``socketengine.aio.Host``/``Client``
build on :class:`EndpointBase`; they add only threads or tasks, and how callers wait.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
from typing import (
    Any,
    Callable,
    Container,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from . import codec, compression, frames, images
from .engine import ConnectionEngine, ConnState
from .errors import ConnectionClosed, EndpointClosed, WriteTimeout
from .fanout import FanOut
from .limits import (
    HostLimits,
    check_client_budget,
    check_compression,
    check_settings,
    check_shm,
)
from .peer import PeerView
from .relay import RelayPolicy, RelaySpec, WritersSpec
from .sendqueue import values_size
from .session import SessionTable
from .state import Admission, Departed, KeptValues, RetainedValues, StoredValues, forget_latest
from .watch import PatternWatch

__all__ = ["EndpointBase"]

logger = logging.getLogger("socketengine")

#: ``fn(conn, channel, value, reply, error)``, see :meth:`EndpointBase.on_request`.
RequestHook = Callable[[Any, str, Any, Any, Optional[str]], Any]
_H = TypeVar("_H", bound=RequestHook)
#: What ``write_many`` takes: a mapping of channel to value, or ``(channel, value)`` pairs.
WriteItems = Union[Mapping[str, Any], Iterable[Tuple[str, Any]]]
#: Channels whose audience a host caches (see ``EndpointBase._wanting``).
_AUDIENCE_CHANNELS = 256


class EndpointBase:
    """The layer-independent half of an endpoint (not used directly)."""

    _kind = "endpoint"
    #: Hosts: callbacks get the connection too, and items carry it.
    _with_conn = False
    #: Over NATS: the gateway carrying this endpoint's connections (docs/nats.md).
    _gateway: Any = None
    _audience_epoch = 0
    _audience_seen: Optional[Tuple[Any, bool, int]] = None
    # channel -> connections that want it (None -> the epochs it was built at).
    _audience_cache: Optional[Dict[Optional[str], Any]] = None
    #: A host's sessions whose writes may be held (``None``: a client).
    _held_table: Optional[SessionTable] = None
    #: Each connection's storage budget (a host's per client; a client's, its own).
    _stored: Dict[Any, StoredValues]
    #: A client's budget for what it keeps from its host (:meth:`_keep_for`).
    _kept: KeptValues
    #: The layer's ``on_message`` hooks and pattern watches (waiters, subscriptions):
    #: each wants every value, on any channel (:meth:`_batch_last`).
    _any: Sequence[Callable[..., Any]]
    _patterns: PatternWatch[Any, Any]

    def _init_endpoint(
        self,
        addr: str,
        *,
        port: int,
        timeout: float,
        token: Union[str, bytes, None],
        max_message: int,
        max_buffer: int,
        handshake_timeout: float,
        heartbeat: Optional[float],
        tls: Optional[ssl.SSLContext],
        image_codec: str,
        image_quality: int,
    ) -> None:
        settings = check_settings(
            port=port,
            timeout=timeout,
            max_message=max_message,
            max_buffer=max_buffer,
            handshake_timeout=handshake_timeout,
            heartbeat=heartbeat,
            tls=tls,
            token=token,
        )
        self.addr = addr
        self._port = settings.port
        self.timeout = settings.timeout
        self.max_message = settings.max_message
        self.max_buffer = settings.max_buffer
        self.handshake_timeout = settings.handshake_timeout
        self.heartbeat = settings.heartbeat
        self.tls = settings.tls
        self._token = settings.token
        self.image_codec = images._check_codec(image_codec)
        self.image_quality = images._check_quality(image_quality)
        self._images = images.ImageLedger()
        # The latest value per channel from any peer (per peer: conn.values).
        self._latest: Dict[str, Any] = {}
        self.opened = False
        self.stopped = False
        self._request_hooks: Tuple[RequestHook, ...] = ()
        #: A relaying host's policy (``relay=``); ``None``: nothing is relayed.
        self._relay: Optional[RelayPolicy] = None
        # Held sessions (hosts): a link's death and its session's suspension, a resume's
        # adoption, and a broadcast's choice of live links and held sessions happen
        # under it, so a write is queued on exactly one of them (threaded layer; the
        # asyncio layer takes it uncontended).
        self._held_lock = threading.RLock()

    # -- compression (opt-in, protocol 1.1 "z") ----------------------------------------

    def _init_compression(self, compression: Optional[str], threshold: int) -> None:
        """Validate ``compression=`` / ``compress_threshold=`` (``ValueError``,
        :class:`~socketengine.compression.CompressionUnavailable` now, not at a write)."""
        #: ``compression=`` as given (None: values are sent as they are).
        self.compression = compression
        self._codecs, self.compress_threshold = check_compression(compression, threshold)

    def _init_shm(self, shm: bool, threshold: int) -> None:
        """Validate ``shm=`` / ``shm_threshold=`` (``TypeError`` / ``ValueError`` now).
        Over NATS (the gateway is set first) shared memory is never offered: the stream
        goes through the servers."""
        threshold_on = check_shm(shm, threshold)
        #: Data sections this large go through shared memory to a peer on this
        #: machine, as this user; ``None``: shared memory is off (``shm=False``, NATS).
        self._shm_threshold = None if self._gateway is not None else threshold_on
        self.shm = shm
        self.shm_threshold = threshold

    def _codec_for(self, conn: Any, compress: Optional[bool]) -> Optional[str]:
        """The codec to compress a value for ``conn`` with, or None (off, or the peer
        announced none of ours).  ``compress=True`` with compression off uses the first
        installed codec."""
        if compress is False or conn is None or conn.engine.state is not ConnState.OPEN:
            return None  # (a write queued while reconnecting may reach another host)
        codecs = self._codecs
        if codecs is None:
            if not compress:
                return None
            codecs = tuple(compression.available())
            if not codecs:
                raise compression.CompressionUnavailable(
                    "write(..., compress=True) needs a codec: "
                    "pip install 'socket.engine[compression]'"
                )
        peer = conn.engine.protocol.peer_codecs
        for name in codecs:
            if name in peer:
                return name
        return None

    def _encode_for(self, conn: Any, channel: str, data: Any, compress: Optional[bool]) -> Any:
        """:func:`frames.value_item` of ``data``, compressed for ``conn`` when the
        settings, ``compress`` and the peer allow it (the writer's thread)."""
        threshold = 0 if compress else self.compress_threshold
        return frames.compressed_item(channel, data, self._codec_for(conn, compress), threshold)

    def _encode_many(
        self, conn: Any, items: WriteItems, compress: Optional[bool]
    ) -> Tuple[frames.EncodedValues, int]:
        """``write_many``: every value of ``items`` encoded as :meth:`write` would (a
        BATCH item or a DATA frame's ``(parts, size)``), and the bytes they will queue.
        Raises ``TypeError``/``ValueError`` naming the item before anything is sent."""
        pairs: Iterable[Any] = items.items() if isinstance(items, Mapping) else items
        if self._codecs is None and not compress:
            out = frames.value_items(pairs)
        else:
            out = frames.encode_pairs(
                pairs, lambda channel, data: self._encode_for(conn, channel, data, compress)
            )
        return out, values_size(out)

    def _encode_groups(
        self, channel: str, data: Any, compress: Optional[bool], conns: Iterable[Any]
    ) -> List[Tuple[Any, List[Any]]]:
        """``[(encoded, connections), ...]`` for a broadcast: encoded once, compressed
        once per codec; a peer without the codec gets the plain value."""
        meta, buffers, data_len = codec.encode(data)
        threshold = 0 if compress else self.compress_threshold
        big = len(meta) + data_len >= threshold
        plain = frames.plain_item(channel, meta, buffers, data_len)
        packed: Dict[Optional[str], Any] = {None: plain}
        groups: Dict[int, Tuple[Any, List[Any]]] = {}
        for conn in conns:
            name = self._codec_for(conn, compress) if big else None
            encoded = packed.get(name)
            if encoded is None and name is not None:
                out = frames.compressed_frame(channel, meta, buffers, data_len, name)
                encoded = packed[name] = plain if out is None else out
            groups.setdefault(id(encoded), (encoded, []))[1].append(conn)
        return list(groups.values())

    def _nats_broadcast(
        self,
        channel: str,
        data: Any,
        retain: bool,
        compress: Optional[bool],
        audience: Callable[[], List[Any]],
    ) -> Optional[int]:
        """A NATS host's ``write_all``: one publish that the servers fan out, when every
        client gets the same plain frame (no retain, no compression, no interest set);
        the number of clients, or ``None`` when the write must go per connection.

        The audience (``audience()``: the clients) is looked at only when a client came,
        went or changed its interest since the last call, so the cost stays flat however
        many clients there are (the point of fanning out)."""
        gateway = self._gateway
        if gateway is None or retain or self._codecs is not None or compress:
            return None
        key = (self._audience_epoch, ConnectionEngine.interest_epoch)
        seen = self._audience_seen
        if seen is None or seen[0] != key:
            conns = audience()
            seen = (key, any(conn.interest is not None for conn in conns), len(conns))
            self._audience_seen = seen
        if seen[1]:
            return None
        parts, _ = frames.value_frame(frames.DATA, channel, data)
        gateway.broadcast(channel, b"".join(parts))
        return seen[2]

    def _audience_changed(self) -> None:
        """Host: a connection came, became ready or closed (see :meth:`_wanting`)."""
        self._audience_epoch += 1

    def _wanting(self, channel: str, conns: Dict[Any, Any]) -> List[Any]:
        """Host: the connections of ``conns`` (every connection, by session) that want
        broadcasts on ``channel``, in connection order, whatever their state: a
        broadcast skips those not open.  Cached per channel (up to
        :data:`_AUDIENCE_CHANNELS` of them) until a connection comes or goes or an
        interest changes, so a broadcast does not ask every connection every time."""
        key = (self._audience_epoch, ConnectionEngine.interest_epoch)
        cache = self._audience_cache
        if cache is None or cache.get(None) != key:
            cache = self._audience_cache = {None: key}
        found = cache.get(channel)
        if found is None:
            found = [c for c in list(conns.values()) if c.wants(channel)]
            if len(cache) <= _AUDIENCE_CHANNELS:
                cache[channel] = found
        return found

    def on_request(self, fn: _H) -> _H:
        """Call ``fn(conn, channel, value, reply, error)`` after every request this
        endpoint answered (usable as a decorator): ``reply`` is what was sent, or
        ``error`` the REPLY_ERROR text (no handler, the handler raised, the reply could
        not be encoded).  For logs and tools (``socketengine host`` prints requests
        with it).  Runs where the reply was made (a callback thread / the event loop);
        an exception in it is logged and changes nothing else."""
        if not callable(fn):
            raise TypeError(f"on_request() needs a callable, not {type(fn).__qualname__}")
        self._request_hooks = (*self._request_hooks, fn)
        return fn

    def _requested(
        self, conn: Any, channel: str, value: Any, reply: Any, error: Optional[str]
    ) -> None:
        for fn in self._request_hooks:
            try:
                fn(conn, channel, value, reply, error)
            except Exception:
                logger.exception("%r: on_request hook %r raised (ignored)", self, fn)

    # -- hosts --------------------------------------------------------------------------

    def _init_host(
        self,
        limits: HostLimits,
        *,
        monitor: Tuple[Optional[int], str, bool],
        relay: Tuple[RelaySpec, WritersSpec, bool],
    ) -> None:
        """What every host has: its validated limits, admission, the departed
        clients, retained values, the monitor settings and the relay policy."""
        self.max_clients = limits.max_clients
        self.max_pending = limits.max_pending
        self.keep_departed = limits.keep_departed
        self.keep_departed_bytes = limits.keep_departed_bytes
        self.max_channels = limits.max_channels
        self.max_stored = limits.max_stored
        self.backlog = limits.backlog
        self._sessions = itertools.count(1)
        # Over NATS, write_all is fanned out by the servers outside each session's
        # numbering: no resume there (a loss ends the session).
        self.resume_window = 0.0 if self._gateway is not None else limits.resume_window
        self.resume_sessions = limits.resume_sessions
        # Resumable sessions (protocol 1.2): live ones, and lost ones kept for a while.
        self._resume = SessionTable(self.resume_window, limits.resume_sessions)
        self._held_table = self._resume
        self._admission = Admission(limits.max_clients, limits.max_pending)
        # A full host refuses in the handshake, once it knows who resumes (protocol).
        self._resume.admit = self._admission.seat
        # Departed clients whose values get_all() still reports (bounded, FIFO).
        self._departed: Departed[int, Any] = Departed(
            limits.keep_departed, limits.keep_departed_bytes
        )
        # Retained values: one complete DATA frame (flag RETAINED) per channel.
        self._retained = RetainedValues(limits.retain_relayed_bytes)
        self._init_monitor(*monitor)
        spec, writers, retain_relayed = relay
        self._relay = RelayPolicy(spec, writers) if spec else None
        self._retain_relayed = bool(retain_relayed)

    # -- resumable sessions (hosts, protocol 1.2) ---------------------------------------

    def _supersede(self, old: Any) -> None:
        """Close ``old`` now: a new link resumed its session (its engine must be
        finished when this returns)."""
        raise NotImplementedError

    def _resumed(self, conn: Any) -> None:
        """A client's handshake completed: if it carries a session, an older link that
        still carries it is closed, and ``conn`` continues its queue (replay first).
        Before anything else is queued for ``conn`` (retained values)."""
        session = conn.engine.session
        if session is None:
            return
        old = session.owner
        session.owner = conn
        if old is not None and old is not conn and not old.engine.closed:
            logger.info("%r: %r resumed its session on a new link", self, conn)
            self._supersede(old)
        with self._held_lock:
            conn._adopt(session.queue)

    def _hold(self, conn: Any, parts: Any, nbytes: int, image: Optional[str]) -> bool:
        """A write to ``conn`` whose link is down: True if it was queued into its held
        session (a host's client that may resume), False when no session is held for it
        (the caller raises :class:`ConnectionClosed`).  Raises :class:`WriteTimeout` if
        the session already holds ``max_buffer`` bytes (the write is lost, counted and
        logged).  Never called with the connection's lock held: ``_held_lock`` comes
        first."""
        session = conn.engine.session
        if self.stopped or session is None or not session.held or self._held_table is None:
            return False
        with self._held_lock:
            if not session.held:
                return False
            queued = session.hold(parts, nbytes, image)
        if not queued:
            raise WriteTimeout(
                f"the link to {conn._peer()} is down and max_buffer="
                f"{conn._queue.max_buffer} bytes already wait for its resume: not sent"
            )
        return True

    def _join_run(
        self, fan: FanOut[Any], item: bytes, channel: str, conns: Dict[Any, Any], now: float
    ) -> bool:
        """Host: the common step of a burst of small broadcasts, in one call.  ``item``
        (a BATCH item on ``channel``) joins ``fan``'s current run when that run is for
        the same audience (:meth:`_wanting` of ``conns``) and no client's link is down
        (no held session, so none must get it).  False, nothing done: the host's full
        broadcast path decides.  Call with the host's ``_held_lock`` (threaded)."""
        table = self._held_table
        if table is not None and table.holding:
            return False
        return fan.join(item, self._wanting(channel, conns), now)

    def _hold_all(
        self, parts: Any, nbytes: int, image: Optional[str], channel: str, exclude: Any = None
    ) -> int:
        """A broadcast on ``channel``: queue it into every held session that wants it
        (a client whose link is down, until it resumes); returns into how many.  Call
        with ``_held_lock``."""
        table = self._held_table
        if table is None:
            return 0
        skip = None if exclude is None else exclude.engine.session
        held = 0
        for session in table.held():
            if session is not skip and session.wants(channel):
                held += session.hold(parts, nbytes, image)
        return held

    def _hold_value(self, channel: str, data: Any) -> int:
        """A broadcast sent compressed to live clients: held sessions get it plain
        (their next link may announce other codecs); returns into how many.  Call
        with ``_held_lock``."""
        table = self._held_table
        if table is None or not table.held():
            return 0
        encoded = frames.value_item(channel, data)
        if type(encoded) is bytes:
            return self._hold_all(encoded, len(encoded), None, channel)
        return self._hold_all(encoded[0], encoded[1], None, channel)

    def _expire_sessions(self) -> None:
        """Forget lost sessions older than ``resume_window`` (at every accepted and every
        closed connection, so a resume never finds one)."""
        if len(self._resume):
            with self._held_lock:
                self._resume_expired(self._resume.expire(time.monotonic()))

    def _mark_gaps(self) -> None:
        """A link was lost: every open subscription records a gap (each layer)."""

    def _gap_from(self, conn: Any) -> None:
        """Host: a client's connection closed; if it was lost (no BYE either way) and
        its session is not kept for a resume, values it sent meanwhile may be missing:
        every open subscription counts a gap, as a client's do when its link is lost."""
        engine = conn.engine
        if self.stopped or engine.bye_sent or engine.bye_received or engine.resumable:
            return
        self._mark_gaps()

    def _keep_session(self, conn: Any) -> None:
        """A connection closed: keep its session for a resume if the link was lost
        (at most ``resume_window`` s, ``resume_sessions`` of them), else forget it."""
        table = self._resume
        now = time.monotonic()
        with self._held_lock:
            self._resume_expired(table.expire(now))
            session = conn.engine.session
            if session is None or session.owner not in (conn, None):
                return  # no session, or a newer link carries it now
            if conn.engine.resumable and not self.stopped:
                self._resume_expired(table.suspend(session, now))
            else:
                table.drop(session)
                if session.queue is not None:
                    session.queue.clear()
                session.fail_requests(
                    ConnectionClosed(f"{conn._peer()} closed before it answered (closed)")
                )

    def _resume_expired(self, sessions: List[Any]) -> None:
        """Lost sessions that were not resumed in time: what they held is dropped."""
        for session in sessions:
            queue = session.queue
            if queue is not None and (queue or queue.replay_bytes):
                logger.warning(
                    "%r: the session of client %r was not resumed in time "
                    "(resume_window=%g s, resume_sessions=%d): %d bytes it held for that "
                    "client are dropped",
                    self,
                    session.name,
                    self.resume_window,
                    self.resume_sessions,
                    queue.queued + queue.replay_bytes,
                )
            if queue is not None:
                queue.clear()
            session.fail_requests(
                ConnectionClosed(
                    f"the session of client {session.name!r} was not resumed in time "
                    f"(resume_window={self.resume_window:g} s) before it answered"
                )
            )

    # -- the browser monitor (hosts) --------------------------------------------------

    def _init_monitor(self, port: Optional[int], addr: str, bgr: bool) -> None:
        self._monitor_port = port
        self._monitor_addr = addr
        self._monitor_bgr = bool(bgr)
        #: The browser monitor (``.url``, ``.port``) when ``monitor=`` was given, once open.
        self.monitor: Optional[Any] = None

    def _start_monitor(self) -> None:
        """Serve the monitor if ``monitor=`` was given (in its own thread)."""
        if self._monitor_port is None or self.monitor is not None:
            return
        from .monitor import Monitor  # imported only when asked for

        self.monitor = Monitor(
            self, port=self._monitor_port, addr=self._monitor_addr, bgr=self._monitor_bgr
        ).start()

    def _stop_monitor(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()

    def _where(self) -> str:
        """Where the endpoint is, for ``repr`` and logs: ``addr:port``, or the host's
        name on a NATS cluster."""
        gateway = self._gateway
        if gateway is not None:
            return f"nats:{gateway.host}"
        return f"{self.addr}:{self._port}"

    @property
    def port(self) -> int:
        """The TCP port (a host's real one once open, when created with ``port=0``)."""
        return self._port

    def _check_not_closed(self) -> None:
        if self.stopped:
            raise EndpointClosed(f"{self!r} is closed; create a new {self._kind}")

    # -- images ---------------------------------------------------------------------------

    def _image_settings(
        self, img: Any, codec: Optional[str], quality: Optional[int]
    ) -> Tuple[str, int]:
        """Validate an image write: ``(codec, quality)`` to encode with (``TypeError`` /
        ``ValueError`` naming the problem before anything is encoded)."""
        name = images.validate(img, self.image_codec if codec is None else codec)
        level = self.image_quality if quality is None else images._check_quality(quality)
        return name, level

    def _image_arrived(self, conn: PeerView, channel: str, value: Any) -> None:
        """An image frame was received (I/O thread / event loop)."""
        encoded = self._images.arrived(channel, value)
        if encoded is not None:
            conn._encoded[channel] = encoded

    def _init_budget(self, max_channels: object, max_stored: object) -> None:
        """A client's ``max_channels`` / ``max_stored``: what it keeps from its host."""
        self._kept = KeptValues(*check_client_budget(max_channels, max_stored, self.max_message))
        self.max_channels, self.max_stored = self._kept.max_channels, self._kept.max_stored

    def _keep_for(self, conn: PeerView) -> None:
        """A client's new connection (before it receives anything): what it receives
        is counted against the client's budget, one :class:`KeptValues` across links
        like the latest values themselves."""
        kept = self._kept
        ledger = self._images
        kept.tables = (
            self._latest,
            conn.values,
            conn.received_at,
            conn.senders,
            conn._encoded,
            ledger.encoded,
            ledger.unread,
        )
        stored = self._stored
        stored.clear()  # an earlier link receives nothing more
        stored[conn] = kept

    def _batch_items(self, conn: PeerView, frame: frames.Frame) -> List[Any]:
        """A BATCH frame's items, flat (``[channel, value, ...]``), decoded once its
        body passed ``conn``'s budget (:meth:`StoredValues.check_batch`: a body too
        large to decode safely raises :class:`ProtocolError`, nothing decoded)."""
        stored = self._stored.get(conn)
        if stored is not None:
            stored.check_batch(frame.meta)
        return frame.items()

    def _batch_last(
        self,
        frame: frames.Frame,
        stored: Optional[StoredValues],
        watched: Sequence[Container[str]] = (),
    ) -> Optional[Tuple[int, Dict[str, Any]]]:
        """A BATCH frame for a receiver where only the last value of each channel
        matters: ``None`` at once if an ``on_message`` hook, a pattern or a relay wants
        every value, else ``None`` as soon as an item is on a channel in one of
        ``watched`` (the layer's waiters, subscriptions, callbacks: its channels whose
        every value is wanted).  Otherwise ``(items, last)``
        (:meth:`frames.Frame.last_items`: every item still decoded and checked, but a
        superseded value is dropped at once instead of all of them being held until
        the frame is stored), accounted against the connection's budget ``stored``
        (``self._stored.get(conn)``, which the caller has looked up;
        :meth:`StoredValues.store_last`), or ``None`` when the budget must count the
        items one by one.  On ``None`` the caller takes the general path
        (:meth:`_batch_items`), which decodes the body (again, unless ``None`` came at
        once)."""
        if self._relay is not None or self._any or self._patterns:
            return None
        if stored is not None:
            stored.check_batch(frame.meta)
        got = frame.last_items(watched)
        if got is None or (stored is not None and not stored.store_last(got[1])):
            return None
        return got

    def _store_unwatched(
        self, conn: PeerView, items: List[Any], last: Optional[Dict[str, Any]], now: float
    ) -> None:
        """A BATCH frame's items (flat ``[channel, value, ...]``) stored at once, when
        nothing watches any channel (no waiter, subscription, callback, hook or
        pattern): the last value of each channel wins, as if the items were stored one
        by one (``last``: those, as :meth:`StoredValues.store_items` hands them back,
        or ``None``).  The caller counts the items, relays them and settles budgets."""
        if last is None:
            last = dict(zip(items[0::2], items[1::2]))
        conn.values.update(last)
        self._latest.update(last)
        conn.received_at.update(dict.fromkeys(last, now))
        self._not_images(conn, last)

    def _not_images(self, conn: PeerView, channels: Iterable[str]) -> None:
        """Values that are not images arrived on ``channels`` (a BATCH's, in any
        order, repeats allowed): :meth:`_not_an_image` for each on which an image is
        kept.  One dict check when none is."""
        ledger = self._images
        kept, unread, conn_kept = ledger.encoded, ledger.unread, conn._encoded
        if kept or unread or conn_kept:
            for channel in channels:
                if channel in kept or channel in unread or channel in conn_kept:
                    self._not_an_image(conn, channel)

    def _not_an_image(self, conn: PeerView, channel: str) -> None:
        """A value that is not an image arrived on ``channel`` (I/O thread / event
        loop): what was kept of an earlier image there goes with it.  The layers call
        this only while some image is kept (:meth:`_images_kept`): a dict check per
        frame on the hot path."""
        conn._encoded.pop(channel, None)
        self._images.superseded(channel)

    def _images_kept(self, conn: PeerView) -> bool:
        """Whether an image file or unread frame is kept for ``conn`` or the endpoint."""
        ledger = self._images
        return bool(conn._encoded or ledger.encoded or ledger.unread)

    def _forget_latest(self, conn: PeerView) -> None:
        """``conn``'s values are forgotten (a departed client, or one turned away): so
        are the endpoint's latest values that are still exactly those, and the image
        files kept for them."""
        forget_latest(self._latest, conn.values)
        if self._images.encoded or self._images.unread:
            self._images.forget(self._latest)

    def _read_host(self, channel: str, default: Any, conns: Iterable[PeerView]) -> Any:
        """A host's ``get``: the latest value, an encoded image decoded once and the
        decoded array put in the sender's own table too (``conns``: every connection
        and departed client), so that ``get_all`` reuses it and forgetting that client
        still recognises its value (``forget_latest`` compares identities)."""
        value = self._latest.get(channel)
        decoded = self._read(self._latest, channel, default)
        if type(value) is images.EncodedImage:
            for conn in conns:
                if conn.values.get(channel) is value:
                    conn.values[channel] = decoded
        return decoded

    def _read(self, table: Dict[str, Any], channel: str, default: Any) -> Any:
        """``table[channel]`` for the user: an encoded image is decoded (and cached)."""
        if channel in self._images.unread:
            self._images.read(channel)
        return images.read_latest(channel, default, table)

    def get_jpeg(self, channel: str = "image") -> Optional[bytes]:
        """The newest JPEG/PNG file received on ``channel``, still encoded, or ``None``.

        For saving or forwarding frames without decoding them (only frames that were
        sent with ``codec="jpeg"`` or ``"png"``; raw frames have no file).
        """
        return self._images.get_jpeg(channel)

    def stats(self) -> Dict[str, Any]:
        """Counters: per image channel, what was sent and received.

        ``{"images": {"sent": {channel: s}, "received": {channel: s}}}`` where each ``s``
        has ``frames`` (written / arrived), ``delivered`` (handed to a socket / to the
        application), ``dropped`` (replaced by a newer frame before that: conflation),
        ``pending``, ``bytes``, ``fps`` (over the last 2 s) and ``codec``.  On a host the
        sent counts add up over clients.
        """
        return {"images": self._images.snapshot()}
