"""Every default, limit and parameter check of socketengine, in one place.

Both I/O layers (``socketengine.Host``/``Client`` and ``socketengine.aio``) take their
defaults from here and validate their arguments with :func:`check_settings`, so the
two accept exactly the same values and say the same thing about bad ones.

Each limit's worst case (memory a peer can make an endpoint hold) is documented in
``docs/guarantees.md``; the short version is beside each constant.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

from . import compression as _compression  # imports no codec library by itself
from .patterns import MAX_INTEREST_BYTES, MAX_INTEREST_KEYS, Interest, Key

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE",
    "MIN_MAX_MESSAGE",
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "DEFAULT_KEEP_DEPARTED",
    "DEFAULT_KEEP_DEPARTED_BYTES",
    "DEFAULT_RETAIN_RELAYED_BYTES",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_STORED",
    "DEFAULT_CLIENT_MAX_CHANNELS",
    "DEFAULT_CLIENT_MAX_STORED",
    "check_client_budget",
    "SMALL_META",
    "BATCH_READ_ABOVE",
    "DEFAULT_SUBSCRIPTION_BYTES",
    "DEFAULT_SUBSCRIPTION_SIZE",
    "CALLBACK_BACKLOG",
    "MAX_NAME_BYTES",
    "MAX_INTEREST_KEYS",
    "MAX_INTEREST_BYTES",
    "check_interest",
    "PRE_HANDSHAKE_MAX",
    "MIN_READ_SIZE",
    "RECONNECT_FIRST",
    "DEFAULT_RECONNECT_MAX",
    "Settings",
    "check_settings",
    "check_port",
    "check_seconds",
    "check_name",
    "check_maxsize",
    "check_timeout",
    "check_compression",
    "COMPRESSION_CHOICES",
    "check_host_limits",
    "HostLimits",
    "DEFAULT_SHM_THRESHOLD",
    "check_shm",
]

#: The seed's port.
DEFAULT_PORT = 8080
#: Seconds a blocking call may wait (seed ``timeout``): a write to a full buffer, the
#: linger of ``close()``, one connection attempt.
DEFAULT_TIMEOUT = 2.0
#: 64 MiB: the largest frame accepted from a peer.  A 4K (2160x3840) RGB frame is
#: 24.9 MB.  Worst case per connection while a frame arrives: this many bytes (only
#: what actually arrives is committed for frames of 16 MiB and more).
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
#: ``max_message`` below this is refused (handshake frames must fit).
MIN_MAX_MESSAGE = 1024
#: 256 MiB: bytes that may wait unsent for one peer before writes block (and then
#: raise ``WriteTimeout``); ``write_all`` tolerates up to twice this for ``timeout``
#: seconds, then drops the peer as a slow consumer.  ``0``: at most one frame queued.
#: With resume (protocol 1.2) it also sizes the replay window: sent values the peer has
#: not acknowledged yet, kept for a lost link.  Once the window holds ``max_buffer``
#: bytes (at least 512.5 KiB, ``sendqueue.WINDOW_MIN``) values wait in the queue until
#: the peer acknowledges some (flow control), so none leaves it unacknowledged.  Worst
#: case per connection: ``2 x max_buffer`` plus one frame (queue + window; 3x briefly
#: for ``write_all``).
#: Counted at wire size; a small value not framed yet also counts its Python overhead
#: (``sendqueue.ITEM_OVERHEAD``), so the memory held stays near this bound.
DEFAULT_MAX_BUFFER = 256 * 1024 * 1024
#: Connections a host serves at once; more are refused with REFUSE ``full``.  Only
#: connections that completed the handshake count (see ``max_pending``).
DEFAULT_MAX_CLIENTS = 1024
#: Handshakes a host runs at once.  One more evicts the oldest pending handshake of the
#: address with the most of them (REFUSE ``busy``), so peers that never finish the
#: handshake cannot keep authenticated clients out.  Worst case: this many connections
#: of at most ``PRE_HANDSHAKE_MAX`` buffered bytes each (8 MiB at the defaults, and in
#: practice a few KiB each).
DEFAULT_MAX_PENDING = 128
#: Distinct channels one client may write on (the host keeps a latest value per channel
#: and client); one more closes the connection (logged).  Names count in ``max_stored``.
DEFAULT_MAX_CHANNELS = 10_000
#: 256 MiB: bytes of latest values (wire size: name, metadata and array bytes; see
#: ``SMALL_META`` for large metadata) the host keeps for one client; a value that would
#: exceed it closes the connection (logged).  Four ``max_message`` values, or ten 4K RGB
#: frames.  When ``max_message`` is raised above it, the default follows
#: ``max_message``.  In memory, a client's values take at most
#: ``max_stored + 111 x (max_stored / 128 + SMALL_META x max_channels)`` (0.73 GiB at the
#: defaults): decoded msgpack of tiny items takes up to 112x its wire size.
DEFAULT_MAX_STORED = 256 * 1024 * 1024
#: A client's latest values from its host: at most this many channels (through a
#: relaying host they are other clients' channels, ten of whose full budgets fit) ...
DEFAULT_CLIENT_MAX_CHANNELS = 100_000
#: ... and this many bytes, counted as a host counts (wire size, see ``SMALL_META``; or
#: ``max_message`` if larger).  Beyond either, the channel that arrived first is
#: forgotten (logged): see ``state.KeptValues``.
DEFAULT_CLIENT_MAX_STORED = 1024 * 1024 * 1024
#: A value whose msgpack metadata is at most this many bytes counts in ``max_stored`` at
#: its wire size, unread (the hot path); a larger one counts at what decoding it takes
#: in Python objects if that is more (``codec.decoded_size``, read before it is decoded),
#: once the peer's values take more than ``max_stored / 128`` (below that, even at 112x
#: they stay within ``max_stored``).
SMALL_META = 256
#: A BATCH body larger than this (only a peer not written in Python sends one: Python
#: senders keep bodies within it) is read before it is decoded
#: (``codec.decoded_size``): if its Python objects would take more than the receiver's
#: ``max_stored``, the connection is closed (logged) and nothing of it is decoded.  A body
#: within it is decoded unread: at most ~112 x 64 KiB = 7 MiB of objects for a moment.
BATCH_READ_ABOVE = 64 * 1024
#: Seconds a new connection has to complete the handshake (TLS included).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Seconds of silence before a PING (H); a peer silent for 3·H is declared dead.
DEFAULT_HEARTBEAT = 5.0
#: 100 us: how long a thread waiting for a reply (``request()``, an acknowledged write,
#: ``sync()``), or on a client for an answer (``wait()`` or a subscription's ``get()``
#: right after a write: ``sendqueue.ANSWER_WINDOW``), polls the socket without
#: sleeping before it blocks (threaded layer).  A reply that comes within it costs no
#: thread wake-up (10-20 us here).  Worst case: this much CPU per such wait while
#: replies come within it; once a spin runs out, the next 1, 3, 7 ... up to 63 waits
#: of that kind on that connection sleep at once (one in 64 spins in vain against a
#: slow peer); never on one CPU.
DEFAULT_SPIN = 100e-6
#: Departed clients whose latest values ``get_all`` keeps reporting.
DEFAULT_KEEP_DEPARTED = 64
#: 256 MiB: bytes of values the departed clients keep, together (as counted by
#: ``max_stored``: the departed keep at most what one connected client may hold); the
#: oldest departed client is forgotten first, in ``get`` as well as ``get_all``.
DEFAULT_KEEP_DEPARTED_BYTES = 256 * 1024 * 1024
#: 256 MiB: bytes of relayed values a host keeps for late joiners (``retain_relayed``),
#: at wire size; the channel relayed least recently is forgotten first.  The clients
#: choose these channels, and the values outlive them: without a bound, a client that
#: writes on ever new channels would grow the host without end.
DEFAULT_RETAIN_RELAYED_BYTES = 256 * 1024 * 1024
#: Messages a subscription holds unread before the sending connections stop being read.
DEFAULT_SUBSCRIPTION_SIZE = 10_000
#: 64 MiB (one ``max_message``): bytes a subscription holds unread before the sending
#: connections stop being read (sans-I/O support in ``SubscriptionBuffer(maxbytes=)``).
DEFAULT_SUBSCRIPTION_BYTES = 64 * 1024 * 1024
#: Callbacks of one connection that may wait to run before it stops being read.
CALLBACK_BACKLOG = 10_000
#: Client names and host names: at most this many UTF-8 bytes.
MAX_NAME_BYTES = 256
#: Largest frame accepted before the handshake completed (every implementation MUST
#: enforce it: an unauthenticated peer cannot make an endpoint allocate more), and the
#: largest INTEREST frame (it carries what a HELLO carries).
PRE_HANDSHAKE_MAX = 64 * 1024
# MAX_INTEREST_KEYS (2048) and MAX_INTEREST_BYTES (32 KiB), imported above from
# patterns.py (which enforces them): a declared interest's keys and their UTF-8 bytes.
# Protocol limits, not settings: the client checks them before its HELLO, when the
# host's settings are not known yet.  Worst case: ~8 MiB of pattern index per connection.
#: Reads offered to the socket are at least this large (the seed's 256-byte reads
#: would cripple throughput).  What a connection's read is offered starts at 4 KiB and
#: grows 4x each time a read fills it, up to this (memory follows the traffic; see
#: ``frames.FrameDecoder``).  Measured against 64 KiB (with the stream buffer compacted
#: in place): a receiver's CPU per small value 0.38 -> 0.25 us
#: (``python -m bench.cost_profile``), a fan-out to 20 clients in one process 1.88M ->
#: 2.12M deliveries/s (medians of 5): fewer receive calls, each a hand-over of the GIL.
MIN_READ_SIZE = 256 * 1024
#: First reconnection delay, seconds; it doubles up to ``reconnect_max`` (+-20 % jitter).
RECONNECT_FIRST = 0.02
#: Default ``reconnect_max``, seconds.
DEFAULT_RECONNECT_MAX = 5.0
#: Seconds a host keeps the session of a client whose link was lost (not closed), so the
#: client can resume it (protocol 1.2): replay what either side missed.  ``0``: never.
DEFAULT_RESUME_WINDOW = 60.0
#: Lost sessions a host keeps at once (the oldest is dropped first).  Worst case, each
#: holds its replay buffer and its unsent queue, each bounded by ``max_buffer``:
#: ``resume_sessions x 2 x max_buffer`` beyond the connected clients' own
#: ``max_clients x 2 x max_buffer`` (send queue + replay buffer).
DEFAULT_RESUME_SESSIONS = 64


def check_port(port: object) -> int:
    """A TCP port number: an int from 0 (any free port) to 65535."""
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
    return port


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_seconds(name: str, value: object, *, allow_none: bool = False) -> Optional[float]:
    """A positive number of seconds (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _number(value) or not value > 0:  # type: ignore[operator]
        tail = ", or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive number of seconds{tail}, not {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_spin(value: object) -> float:
    """``spin``: seconds >= 0 (0 disables), or ``None`` for :func:`default_spin`."""
    if value is None:
        return default_spin()
    if not _number(value) or not 0 <= value <= 1:  # type: ignore[operator]
        raise ValueError(
            f"spin must be a number of seconds from 0 to 1 (0 disables), not {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def default_spin() -> float:
    """:data:`DEFAULT_SPIN` where this process may run on more than one CPU, else 0
    (a spinning waiter would only delay the thread it waits for)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return DEFAULT_SPIN if cpus > 1 else 0.0


def check_timeout(value: object) -> float:
    """The seed's ``timeout``: a number of seconds >= 0."""
    if not _number(value) or not value >= 0:  # type: ignore[operator]
        raise ValueError(f"timeout must be a number of seconds >= 0, not {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_name(name: object, what: str = "name") -> Optional[str]:
    """A client or host name: ``None`` or a str of at most 256 UTF-8 bytes."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__qualname__}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise TypeError(f"{what} must be at most {MAX_NAME_BYTES} UTF-8 bytes long")
    return name


def check_interest(keys: Optional[Iterable[Key]]) -> Optional[Interest]:
    """A client's ``interest``: ``None`` (everything), or at most
    :data:`MAX_INTEREST_KEYS` exact names and patterns of at most
    :data:`MAX_INTEREST_BYTES` UTF-8 bytes together (protocol limits: a host closes the
    connection of a client beyond them, so the client refuses them before sending).

    :raises TypeError: a key is neither a str nor a ``Pattern``.
    :raises ValueError: beyond a limit; the message names it.
    """
    return None if keys is None else Interest.declared(keys)


def check_maxsize(maxsize: object) -> int:
    """A subscription's ``maxsize``: an int >= 1."""
    if type(maxsize) is not int or maxsize < 1:
        raise ValueError(f"maxsize must be an int >= 1, not {maxsize!r}")
    return maxsize


def _check_int(name: str, value: object, minimum: int) -> int:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """The validated settings every endpoint has, whichever its I/O layer."""

    port: int
    timeout: float
    max_message: int
    max_buffer: int
    handshake_timeout: float
    heartbeat: Optional[float]
    tls: Optional[ssl.SSLContext]
    token: Optional[bytes]


def check_settings(
    *,
    port: object,
    timeout: object,
    max_message: object,
    max_buffer: object,
    handshake_timeout: object,
    heartbeat: object,
    tls: object,
    token: Union[str, bytes, None],
) -> Settings:
    """Validate the parameters both endpoint kinds share, in both I/O layers.

    Raises ``ValueError``/``TypeError`` naming the parameter and what it must be.
    """
    from .protocol import token_bytes

    if tls is not None and not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, not {type(tls).__qualname__}")
    if type(max_message) is not int or max_message < MIN_MAX_MESSAGE:
        raise ValueError(
            f"max_message must be an int of at least {MIN_MAX_MESSAGE} bytes, not {max_message!r}"
        )
    return Settings(
        port=check_port(port),
        timeout=check_timeout(timeout),
        max_message=max_message,
        max_buffer=_check_int("max_buffer", max_buffer, 0),
        handshake_timeout=check_seconds("handshake_timeout", handshake_timeout) or 0.0,
        heartbeat=check_seconds("heartbeat", heartbeat, allow_none=True),
        tls=tls,
        token=token_bytes(token),
    )


@dataclass(frozen=True)
class HostLimits:
    """A host's own validated limits, whichever its I/O layer."""

    max_clients: int
    max_pending: int
    keep_departed: int
    keep_departed_bytes: int
    max_channels: int
    max_stored: int
    backlog: int
    resume_window: float = DEFAULT_RESUME_WINDOW
    resume_sessions: int = DEFAULT_RESUME_SESSIONS
    retain_relayed_bytes: int = DEFAULT_RETAIN_RELAYED_BYTES


def check_client_budget(
    max_channels: object, max_stored: object, max_message: int
) -> Tuple[int, int]:
    """Validate a client's ``max_channels`` / ``max_stored`` (``None``: 1 GiB, or
    ``max_message`` if that is larger)."""
    if max_stored is None:
        max_stored = max(DEFAULT_CLIENT_MAX_STORED, max_message)
    return _check_int("max_channels", max_channels, 1), _check_int("max_stored", max_stored, 1)


def check_host_limits(
    max_clients: object,
    keep_departed: object,
    backlog: object,
    *,
    max_pending: object = DEFAULT_MAX_PENDING,
    keep_departed_bytes: object = DEFAULT_KEEP_DEPARTED_BYTES,
    max_channels: object = DEFAULT_MAX_CHANNELS,
    max_stored: object = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    resume_window: object = DEFAULT_RESUME_WINDOW,
    resume_sessions: object = DEFAULT_RESUME_SESSIONS,
    retain_relayed_bytes: object = DEFAULT_RETAIN_RELAYED_BYTES,
) -> HostLimits:
    """Validate a host's own limits.  ``max_stored=None``: 256 MiB, or ``max_message``
    if that is larger (one value of the largest size must fit)."""
    if max_stored is None:
        max_stored = max(DEFAULT_MAX_STORED, max_message)
    return HostLimits(
        max_clients=_check_int("max_clients", max_clients, 1),
        max_pending=_check_int("max_pending", max_pending, 1),
        keep_departed=_check_int("keep_departed", keep_departed, 0),
        keep_departed_bytes=_check_int("keep_departed_bytes", keep_departed_bytes, 0),
        max_channels=_check_int("max_channels", max_channels, 1),
        max_stored=_check_int("max_stored", max_stored, 1),
        backlog=_check_int("backlog", backlog, 1),
        resume_window=(
            0.0
            if type(resume_window) in (int, float) and resume_window == 0
            else check_seconds("resume_window", resume_window) or 0.0
        ),
        resume_sessions=_check_int("resume_sessions", resume_sessions, 0),
        retain_relayed_bytes=_check_int("retain_relayed_bytes", retain_relayed_bytes, 0),
    )


#: ``compress_threshold=`` default: values whose encoding is smaller are sent as they are.
DEFAULT_COMPRESS_THRESHOLD = _compression.DEFAULT_THRESHOLD
#: ``compression=`` choices besides ``None`` (off): a codec, or ``"auto"`` (the first
#: installed one, see :func:`socketengine.compression.available`).
COMPRESSION_CHOICES = ("zstd", "lz4", "auto")


def check_compression(
    compression: object, threshold: object
) -> Tuple[Optional[Tuple[str, ...]], int]:
    """Validate ``compression=`` / ``compress_threshold=``: ``(codecs this endpoint
    sends with, preferred first, or None when off; threshold in bytes)``.

    :raises ValueError: unknown codec name, or a threshold that is not an int >= 0.
    :raises CompressionUnavailable: the codec's library is not installed.
    """
    threshold = _check_int("compress_threshold", threshold, 0)
    if compression is None:
        return None, threshold
    if type(compression) is not str or compression not in COMPRESSION_CHOICES:
        raise ValueError(
            f"compression must be None (off) or one of {COMPRESSION_CHOICES}, not {compression!r}"
        )
    if compression == "auto":
        codecs = tuple(_compression.available())
        if not codecs:
            raise _compression.CompressionUnavailable(
                "compression='auto' found no codec: pip install 'socket.engine[compression]'"
            )
        return codecs, threshold
    _compression._module(compression)  # CompressionUnavailable naming the package
    return (compression,), threshold


#: ``shm_threshold=`` default, bytes: data sections (array bytes) at least this large go
#: through shared memory when the peer is on this machine as this user.  Below it the
#: socket is as fast (a descriptor and two copies cost a few microseconds either way).
DEFAULT_SHM_THRESHOLD = 64 * 1024


def check_shm(shm: object, threshold: object) -> Optional[int]:
    """Validate ``shm=`` / ``shm_threshold=``: the threshold in bytes, or None when
    shared memory is off.

    :raises TypeError: ``shm`` is not a bool.
    :raises ValueError: the threshold is not an int >= 1.
    """
    if type(shm) is not bool:
        raise TypeError(f"shm must be True or False, not {shm!r}")
    threshold = _check_int("shm_threshold", threshold, 1)
    return threshold if shm else None
