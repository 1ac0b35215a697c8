"""Shared memory between two endpoints on the same machine, as the same user (sans-I/O).

docs/protocol.md ("Shared memory") is the normative description; in short:

* **Identity.**  Each process has one *identity* memfd (``os.memfd_create``) holding
  :data:`MAGIC` and a random 16-byte tag.  HELLO / WELCOME announce
  ``"shm": [pid, fd, tag]``.  The peer opens ``/proc/<pid>/fd/<fd>`` and compares the
  bytes with the tag: the kernel allows that open only to a process of the same user
  on the same machine (and the same PID namespace), so succeeding proves all three.
  The host answers ``"shm_ok": true`` in WELCOME when it read the client's; the
  client uses shared memory only after it read the host's too.
* **Segments.**  A writer puts large data sections (numpy arrays, raw image frames)
  into *slots* of a memfd segment of its own and sends a DATA frame with
  :data:`frames.FLAG_SHM` whose data section is a 40-byte descriptor
  (:data:`DESCRIPTOR`).  The reader opens the segment the same way, copies the slot
  out into a buffer of its own (the value the application gets is an ordinary array,
  valid as long as it is held), and marks the slot released.
* **Slots.**  A slot header holds ``seq`` (written by the writer) and ``released``
  (written by the reader).  The writer only reuses a slot whose ``released`` equals its
  ``seq``; with none free (after a short wait on a thread, :data:`SLOT_WAIT`) it sends
  the frame through the socket as usual.  So the writer never blocks on the reader, a
  frame is never overwritten before the reader copied it, and the reader checks
  ``seq`` against the descriptor (a mismatch is a protocol error).

memfd segments have no name: nothing is ever left in ``/dev/shm``; the kernel frees a
segment when the last descriptor and mapping are gone, so the death of either process
(even ``kill -9``) leaves nothing behind.  The memfd is also ``chmod 0600``.

Everything here is Linux only (``memfd_create`` and ``/proc``); :func:`available`
says whether this process can use it.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import stat
import struct
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ProtocolError

__all__ = [
    "MAGIC",
    "DESCRIPTOR",
    "SLOTS",
    "available",
    "identity",
    "check_peer",
    "ShmWriter",
    "ShmReader",
]

logger = logging.getLogger("socketengine")

#: First bytes of the identity memfd and of every segment.
MAGIC = b"SENGSHM1"
TAG_SIZE = 16
#: Descriptor (the data section of a FLAG_SHM frame), little-endian:
#: ``u32 segment id | u32 fd | u64 segment size | u64 slot offset | u64 length | u64 seq``.
DESCRIPTOR = struct.Struct("<IIQQQQ")
#: Segment header: magic (8) | tag (16) | u32 segment id | u32 slot count, padded to 64.
_SEGMENT_HEAD = struct.Struct("<8s16sII")
_HEAD_SIZE = 64
#: Slot header: ``u64 seq | u64 released``, padded to 64 (the data stays 64-aligned).
_SLOT = struct.Struct("<QQ")
_SLOT_HEAD = 64
#: Slots per segment: how many frames a writer may have in flight through shared
#: memory to one peer before it sends through the socket (worst case memory per
#: connection and direction: SLOTS x the largest frame, committed as written).
SLOTS = 4
#: Segments a writer keeps open at once (one current, the others waiting for the
#: receiver to release their slots): with all of them held, frames go through the socket.
#: Worst case per connection and direction: SEGMENTS x SLOTS x the largest frame.
SEGMENTS = 4
#: Receive mode.  False (the default): the slot is copied out into a buffer of the
#: receiver's and released at once.  True (measured alternative, bench/shm.py): the
#: array the application gets is a view of the slot itself (zero-copy) and the slot is
#: released when the last array using it is gone.  Not the default because a kept value
#: (the latest value of a channel, a departed client's values) then pins its writer's
#: whole segment (SLOTS frames) and one descriptor, and starves the writer of slots.
LEASE = False
#: How long a writer on a thread (the threaded layer; never an event loop) waits for the
#: reader to release a slot before it opens another segment or, with all of them held,
#: sends the frame through the socket (seconds).  A reader a little slower than its
#: writer otherwise falls 16 frames behind and then gets every other frame through the
#: socket, which costs both sides far more than the wait (1080p in one process: 84 of
#: 201 frames went by the socket).  After a wait that found no slot the writer stops
#: waiting until a slot is free again, so a stalled reader costs one wait.
SLOT_WAIT = 0.002
_SLOT_POLL = 0.0001
#: Copies at least this large go through numpy, which releases the GIL while it copies:
#: in one process the writer's and the reader's copies then overlap, and the other
#: threads (I/O, application) are not held up behind them.
_NOGIL_COPY = 1024 * 1024

_identity: Optional[Tuple[int, int, bytes]] = None
_identity_lock = threading.Lock()


def available() -> bool:
    """This platform has memfd and ``/proc/<pid>/fd`` (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "memfd_create")


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity() -> Optional[Tuple[int, int, bytes]]:
    """``(pid, fd, tag)`` of this process's identity memfd (created once per process),
    or None when shared memory is unavailable here."""
    global _identity
    if not available():
        return None
    with _identity_lock:
        pid = os.getpid()
        if _identity is not None and _identity[0] == pid:
            return _identity
        try:
            tag = os.urandom(TAG_SIZE)
            fd = _memfd("socketengine-id", len(MAGIC) + TAG_SIZE)
            os.pwrite(fd, MAGIC + tag, 0)
        except OSError as exc:
            logger.debug("shared memory unavailable: memfd_create failed: %s", exc)
            return None
        _identity = (pid, fd, tag)
        return _identity


def announce() -> Optional[List[Any]]:
    """What HELLO / WELCOME carry as ``"shm"``, or None when unavailable."""
    ident = identity()
    return None if ident is None else [ident[0], ident[1], ident[2]]


def _open_peer(pid: int, fd: int, flags: int) -> int:
    """Open a peer's memfd through ``/proc``.  ``pid`` and ``fd`` come from the peer
    (before its token is checked): only a memfd is ever opened, never blocking and
    never as a controlling terminal, so an announcement naming a FIFO, a device or a
    file cannot stall or touch anything.  Raises ``OSError`` for anything else."""
    path = f"/proc/{pid}/fd/{fd}"
    if not os.readlink(path).startswith("/memfd:"):
        raise OSError(errno.EINVAL, "not a memfd")
    handle = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):  # replaced since the readlink
            raise OSError(errno.EINVAL, "not a memfd")
    except OSError:
        os.close(handle)
        raise
    return handle


def check_peer(value: Any) -> Optional[Tuple[int, bytes]]:
    """``(pid, tag)`` of a peer's ``"shm"`` announcement when this process can read its
    identity memfd (same machine, same user), else None (logged at DEBUG)."""
    if not available():
        return None
    if (
        type(value) is not list
        or len(value) != 3
        or type(value[0]) is not int
        or type(value[1]) is not int
        or type(value[2]) is not bytes
        or not 0 < value[0] < 1 << 31
        or not 0 <= value[1] < 1 << 31
        or len(value[2]) != TAG_SIZE
    ):
        logger.debug("shared memory not used: malformed announcement %r", value)
        return None
    pid, fd, tag = value
    try:
        handle = _open_peer(pid, fd, os.O_RDONLY)
    except OSError as exc:
        logger.debug("shared memory not used: cannot open the peer's memfd: %s", exc)
        return None
    try:
        got = os.pread(handle, len(MAGIC) + TAG_SIZE, 0)
    except OSError as exc:
        logger.debug("shared memory not used: cannot read the peer's memfd: %s", exc)
        return None
    finally:
        os.close(handle)
    if got != MAGIC + tag:
        logger.debug("shared memory not used: the peer's memfd holds something else")
        return None
    return pid, tag


class _Segment:
    """One memfd of the writer, mapped, with :data:`SLOTS` slots of ``slot_size``."""

    __slots__ = ("id", "fd", "size", "slot_size", "map", "next", "__weakref__")

    def __init__(self, seg_id: int, tag: bytes, data_size: int) -> None:
        self.id = seg_id
        self.slot_size = _SLOT_HEAD + (-(-data_size // 64) * 64)
        self.size = _HEAD_SIZE + SLOTS * self.slot_size
        self.fd = _memfd("socketengine-shm", self.size)
        try:
            self.map = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        _SEGMENT_HEAD.pack_into(self.map, 0, MAGIC, tag, seg_id, SLOTS)
        self.next = 0

    def free_slot(self) -> int:
        """Offset of a released slot (round robin from the last one), or -1."""
        unpack = _SLOT.unpack_from
        for k in range(SLOTS):
            i = (self.next + k) % SLOTS
            off = _HEAD_SIZE + i * self.slot_size
            seq, released = unpack(self.map, off)
            if seq == released:
                self.next = (i + 1) % SLOTS
                return off
        return -1

    def idle(self) -> bool:
        """Every slot was released (the reader is done with every descriptor)."""
        unpack = _SLOT.unpack_from
        for i in range(SLOTS):
            seq, released = unpack(self.map, _HEAD_SIZE + i * self.slot_size)
            if seq != released:
                return False
        return True

    def close(self) -> None:
        try:
            self.map.close()
        finally:
            os.close(self.fd)


def _close_all(segments: List[_Segment]) -> None:
    for seg in segments:
        try:
            seg.close()
        except (OSError, ValueError, BufferError):  # pragma: no cover - best effort
            pass
    segments.clear()


class ShmWriter:
    """The sending half for one connection: puts data sections into slots.

    :param threshold: data sections of at least this many bytes go through shared
        memory; smaller ones through the socket.

    Thread-safe: :meth:`put` (the connection's one flusher) and :meth:`close` (any
    thread) take a lock.  A growing frame size makes a new segment; the old one is
    closed once the reader released all of its slots.
    """

    def __init__(self, threshold: int) -> None:
        ident = identity()
        if ident is None:
            raise OSError("shared memory is unavailable")
        self._tag = ident[2]
        self.threshold = threshold
        self._lock = threading.Lock()
        self._segment: Optional[_Segment] = None
        self._retired: List[_Segment] = []
        self._all: List[_Segment] = []
        self._seq = 0
        self._closed = False
        #: Seconds :meth:`put` may wait for a free slot (see :data:`SLOT_WAIT`); 0: never.
        self.slot_wait = 0.0
        self._stalled = False  # the last wait found no slot: do not wait again until one is free
        #: Frames that went through shared memory / through the socket for want of a slot.
        self.frames = 0
        self.fallbacks = 0
        # The fds are plain ints: close them even if close() is never called.
        self._finalizer = weakref.finalize(self, _close_all, self._all)

    def put(self, buffers: Sequence[Any], data_len: int) -> Optional[bytes]:
        """Copy ``buffers`` (``data_len`` bytes together) into a free slot and return
        the descriptor, or None: no slot is free (send through the socket), or closed."""
        with self._lock:
            if self._closed:
                return None
            seg = self._segment
            if seg is None or seg.slot_size - _SLOT_HEAD < data_len:
                seg = self._new_segment(data_len)
                if seg is None:
                    return None
            elif self._retired:
                self._reap()
            off = seg.free_slot()
            if off < 0:
                seg, off = self._older_slot(seg)
            if off < 0 and self.slot_wait > 0 and not self._stalled:
                # The lock stays held: close() waits at most slot_wait.
                seg, off = self._wait_slot(seg)
                self._stalled = off < 0
            elif off >= 0:
                self._stalled = False
            if off < 0 and len(self._all) < SEGMENTS:
                # Every slot held (in flight, or leased by the receiver's application):
                # a fresh segment, the full one retired until its slots come back.
                seg = self._new_segment(seg.slot_size - _SLOT_HEAD)
                off = -1 if seg is None else seg.free_slot()
            if seg is None or off < 0:
                self.fallbacks += 1
                return None
            mm = seg.map
            pos = off + _SLOT_HEAD
            # memoryview slices: one plain memcpy each (mmap's own slice assignment is
            # 2-3x slower: measured 0.79 vs 0.30 ms for a 1080p frame).
            with memoryview(mm) as view:
                for buf in buffers:
                    src = memoryview(buf)
                    if src.format != "B" or src.ndim != 1:
                        src = src.cast("B")
                    n = src.nbytes
                    _copy(view[pos : pos + n], src)
                    pos += n
            self._seq += 1
            seq = self._seq
            # Written after the data; the reader reads it only after the descriptor
            # arrived through the socket (a system call on both sides in between).
            struct.pack_into("<Q", mm, off, seq)
            self.frames += 1
            return DESCRIPTOR.pack(seg.id, seg.fd, seg.size, off, data_len, seq)

    def _wait_slot(self, seg: _Segment) -> Tuple[_Segment, int]:
        """Poll for up to :attr:`slot_wait` seconds for a released slot of this size."""
        deadline = time.monotonic() + self.slot_wait
        off = -1
        while off < 0 and time.monotonic() < deadline:
            time.sleep(_SLOT_POLL)  # releases the GIL: a reader in this process goes on
            off = seg.free_slot()
            if off < 0:
                seg, off = self._older_slot(seg)
        return seg, off

    def _older_slot(self, seg: _Segment) -> Tuple[_Segment, int]:
        """A free slot in a retired segment of the same size (which becomes current)."""
        for other in self._retired:
            if other.slot_size == seg.slot_size:
                off = other.free_slot()
                if off >= 0:
                    self._retired.remove(other)
                    self._retired.append(seg)
                    self._segment = other
                    return other, off
        return seg, -1

    def _new_segment(self, data_len: int) -> Optional[_Segment]:
        try:
            seg = _Segment(next(_ids) & 0xFFFFFFFF, self._tag, max(data_len, 1))
        except (OSError, ValueError) as exc:
            logger.debug("shared memory: cannot make a %d-byte segment: %s", data_len, exc)
            self.fallbacks += 1
            return None
        old = self._segment
        if old is not None:
            self._retired.append(old)
        self._segment = seg
        self._all.append(seg)
        self._reap()
        return seg

    def _reap(self) -> None:
        """Close retired segments of another slot size that the reader is done with.

        Segments of the current size stay open for reuse (:meth:`_older_slot`): closing
        them once idle made a stream of large frames create, fault in and map a fresh
        segment every few frames (measured: 25 new segments per 200 1080p frames).
        """
        current = self._segment
        size = -1 if current is None else current.slot_size
        keep = []
        for seg in self._retired:
            if seg.slot_size != size and seg.idle():
                seg.close()
                self._all.remove(seg)
            else:
                keep.append(seg)
        self._retired = keep

    def close(self) -> None:
        """Unmap and close every segment (the reader keeps its own mappings)."""
        with self._lock:
            self._closed = True
            self._segment = None
            self._retired = []
            self._finalizer()


_ids = itertools.count(1)  # segment ids, unique in this process (next() is atomic)


class ShmReader:
    """The receiving half for one connection: maps the peer's segments, copies out.

    :param pid: the peer's process id; :param tag: its identity tag (every segment
    header must carry it).  At most :data:`SEGMENTS` of the peer's segments stay mapped
    (plus those that arrays handed out still use).
    """

    def __init__(self, pid: int, tag: bytes) -> None:
        self.pid = pid
        self.tag = tag
        self._maps: Dict[int, mmap.mmap] = {}

    def _segment(self, seg_id: int, fd: int, size: int) -> mmap.mmap:
        mm = self._maps.get(seg_id)
        if mm is not None:
            return mm
        try:
            handle = _open_peer(self.pid, fd, os.O_RDWR)
        except OSError as exc:
            raise ProtocolError(
                f"cannot open the peer's shared memory segment ({exc}); "
                "pass shm=False to both endpoints if this machine forbids it"
            ) from None
        try:
            if os.fstat(handle).st_size != size or size < _HEAD_SIZE:
                raise ProtocolError("shared memory segment size differs from its descriptor")
            mm = mmap.mmap(handle, size)
        finally:
            os.close(handle)
        magic, tag, sid, slots = _SEGMENT_HEAD.unpack_from(mm, 0)
        if magic != MAGIC or tag != self.tag or sid != seg_id or slots != SLOTS:
            mm.close()
            raise ProtocolError("shared memory descriptor names another segment")
        # The writer has at most SEGMENTS open: keep as many mappings, forget the oldest
        # (a mapping that arrays still use stays until they are gone).
        while len(self._maps) >= SEGMENTS:
            _unmap(self._maps.pop(next(iter(self._maps))))
        self._maps[seg_id] = mm
        return mm

    def read(self, desc: Any, max_size: int, take: Any) -> Any:
        """Copy the slot ``desc`` names into ``take(length)`` (a new buffer), mark it
        released and return the buffer.  Raises :class:`ProtocolError` if the
        descriptor is malformed or the slot holds another frame."""
        if len(desc) != DESCRIPTOR.size:
            raise ProtocolError("shared memory descriptor of the wrong size")
        seg_id, fd, size, off, length, seq = DESCRIPTOR.unpack_from(desc)
        if length > max_size:
            raise ProtocolError(
                f"peer put a {length}-byte frame in shared memory; max_message is "
                f"{max_size} bytes (raise max_message on this endpoint if such frames "
                "are expected)"
            )
        if off < _HEAD_SIZE or off + _SLOT_HEAD + length > size:
            raise ProtocolError("shared memory descriptor points outside its segment")
        mm = self._segment(seg_id, fd, size)
        start = off + _SLOT_HEAD
        now, _ = _SLOT.unpack_from(mm, off)
        if now != seq:
            raise ProtocolError("shared memory slot was overwritten before it was read")
        if LEASE and length:
            np = _numpy()
            if np is not None:
                # Zero-copy: the slot is the array's memory.  The writer may not reuse
                # it until every array using it is gone (then the finaliser releases it).
                leased = np.frombuffer(mm, np.uint8, count=length, offset=start)
                weakref.finalize(leased, _release, mm, off, seq)
                return leased
        out = take(length)
        # memoryview to memoryview: one memcpy (bytearray[:] = view would first copy
        # the view into a temporary bytearray).
        with memoryview(mm) as view, view[start : start + length] as part:
            with memoryview(out) as dst:
                _copy(dst, part)
        _release(mm, off, seq)
        return out

    def close(self) -> None:
        """Forget the mappings (those that arrays still use stay until they are gone)."""
        for mm in self._maps.values():
            _unmap(mm)
        self._maps.clear()


def _copy(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` (byte-format, one-dimensional, the same length): one memcpy,
    without the GIL when large and numpy is there."""
    if len(src) >= _NOGIL_COPY:
        np = _numpy()
        if np is not None:
            np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))
            return
    dst[:] = src


def _release(mm: mmap.mmap, off: int, seq: int) -> None:
    """Tell the writer the slot at ``off`` (holding ``seq``) may be reused."""
    try:
        struct.pack_into("<Q", mm, off + 8, seq)
    except ValueError:  # pragma: no cover - unmapped meanwhile
        pass


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # arrays still use it: unmapped when the last one is gone


_np: List[Any] = []


def _numpy() -> Any:
    if not _np:
        try:
            import numpy
        except ImportError:  # pragma: no cover - numpy is what sends data sections
            _np.append(None)
        else:
            _np.append(numpy)
    return _np[0]
