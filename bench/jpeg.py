"""JPEG video at 1080p: socketengine against imagezmq, simplejpeg on both sides.

``jpeg`` / ``jpeg_xproc`` (throughput).  The sender stamps a frame id into a
camera-like 1080x1920x3 BGR frame, JPEG-encodes it at quality 90 and sends it; the
receiver decodes **every frame it counts** and reads the id back.  Frames/s are frames
delivered *and decoded* by the receiver, until the last one is decoded.

* socketengine: ``client.write_image(frame, codec="jpeg", quality=90)`` (simplejpeg
  encodes in the writing thread); the host reads ``host.subscribe("image")``, whose
  ``get()`` returns every frame that arrived, decoded in the reading thread.  A frame
  still queued unsent when the next is written is replaced (conflation): hence
  ``delivered_pct``.
* imagezmq (REQ/REP, its default): ``ImageSender.send_jpg(name,
  simplejpeg.encode_jpeg(frame, quality=90, colorspace="BGR", colorsubsampling="420"))``,
  which waits for the hub's reply; the hub runs ``recv_jpg()``,
  ``simplejpeg.decode_jpeg(buf, colorspace="BGR")``, then ``send_reply(b"OK")`` -- the
  loop of imagezmq's examples.  ``colorsubsampling="420"`` is what socketengine's codec
  uses (simplejpeg's default is 4:4:4): both sides move byte-identical ~265 kB files.
* imagezmq-pubsub: the same with ``REQ_REP=False`` (the sender's PUB binds, the hub's
  SUB connects; no reply, nothing blocks the sender).

``slow_receiver`` (latency).  A camera process sends frames at a fixed rate (30 fps)
for a fixed time; the receiver process takes each frame it can get, decodes it, reads
its id, then "works" on it for 100 ms (a sleep: the workload, not a synchronisation).
For every frame handled, its age = time it was available as pixels to the receiver
minus the time the camera captured it (CLOCK_MONOTONIC is system-wide).

* socketengine: ``host.get("image")`` -- the newest frame (``host.wait`` when it has
  already been handled); older frames are simply superseded.
* imagezmq-pubsub: ``recv_jpg()`` returns the oldest queued frame: the backlog grows.
* imagezmq (REQ/REP): the hub replies after its work, so the camera blocks in
  ``send_jpg`` and skips the frames it could not send: the age stays low but the
  camera's send rate falls to the receiver's pace (``send_fps``).

The frame id is 16 black/white 32x32 blocks (one per bit) in the top-left corner,
read back by thresholding block means: robust to JPEG, identical for every library.
All sockets are on 127.0.0.1 with ephemeral ports (imagezmq's hub binds
``tcp://127.0.0.1:*``); every wait has a timeout.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .common import (
    LOCALHOST,
    SE,
    BenchCheckFailed,
    BenchTimeout,
    close_quietly,
    deadline_in,
    left,
    now,
)
from .xproc import Remote, shutdown_all

#: imagezmq in its default REQ/REP pattern, and in PUB/SUB.
IZMQ = "imagezmq"
IZMQ_PS = "imagezmq-pubsub"
LIBS = [SE, IZMQ, IZMQ_PS]

QUALITY = 90
CHANNEL = "image"
SENDER_NAME = "cam-1"  # imagezmq's text message (usually the sender's host name)
SHAPE = (1080, 1920, 3)

ID_BITS = 16
ID_BLOCK = 32
WARM_ID = (1 << ID_BITS) - 2
LAST_ID = (1 << ID_BITS) - 1
POOL = 4

#: Sensor noise (standard deviation, grey levels) of the synthetic camera frame.
NOISE = 2.5
#: Chroma subsampling of every JPEG here: socketengine's jpeg codec uses 4:2:0, so the
#: imagezmq side passes ``colorsubsampling="420"`` to simplejpeg too (its default is
#: 4:4:4, ~45 % bigger and slower): both libraries move the same files.
SUBSAMPLING = "420"

#: Largest acceptable mean absolute pixel error of the last frame (JPEG q90 is ~1-2).
MAX_MEAN_ERROR = 4.0


def missing() -> Optional[str]:
    """Why these workloads cannot run here (``None``: they can)."""
    try:
        import numpy  # noqa: F401
        import simplejpeg  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    return None


def imagezmq_missing() -> Optional[str]:
    try:
        import imagezmq  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    return None


# -- frames -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def camera_frame(seed: int = 1234) -> Any:
    """A deterministic camera-like 1080p BGR frame: smooth gradients, flat objects and
    sensor noise: ~270 kB as JPEG quality 90 with 4:2:0 chroma subsampling."""
    import numpy as np

    h, w, _ = SHAPE
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.empty(SHAPE, np.float32)
    img[..., 0] = 110 + 70 * np.sin(6 * x + 2 * y)
    img[..., 1] = 100 + 60 * np.cos(4 * y - 3 * x)
    img[..., 2] = 120 + 50 * np.sin(5 * y + 1)
    for _ in range(40):  # discs, drawn inside their bounding boxes
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(15, 160))
        y0, y1, x0, x1 = max(0, cy - r), min(h, cy + r), max(0, cx - r), min(w, cx + r)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1][(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    for _ in range(40):  # rectangles
        x0, y0 = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 200))
        img[y0 : y0 + int(rng.integers(10, 200)), x0 : x0 + int(rng.integers(10, 200))] = (
            rng.integers(0, 256, 3)
        )
    img += rng.normal(0.0, NOISE, SHAPE).astype(np.float32)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def frame_pool() -> List[Any]:
    """``POOL`` distinct frames (the scene panned), cycled through by the senders."""
    import numpy as np

    base = camera_frame()
    return [np.ascontiguousarray(np.roll(base, 64 * i, axis=1)) for i in range(POOL)]


def warm_frame() -> Any:
    f = camera_frame().copy()
    stamp_id(f, WARM_ID)
    return f


def last_frame() -> Any:
    """The distinct last frame of a throughput run (checked by the receiver)."""
    import numpy as np

    f = np.ascontiguousarray(camera_frame()[::-1])
    stamp_id(f, LAST_ID)
    return f


def stamp_id(frame: Any, fid: int) -> None:
    """Write ``fid`` as 16 black/white 32x32 blocks, most significant bit first."""
    if not 0 <= fid <= LAST_ID:
        raise ValueError(f"frame id {fid} does not fit in {ID_BITS} bits")
    row = frame[:ID_BLOCK, : ID_BITS * ID_BLOCK]
    for bit in range(ID_BITS):
        on = (fid >> (ID_BITS - 1 - bit)) & 1
        row[:, bit * ID_BLOCK : (bit + 1) * ID_BLOCK] = 255 if on else 0


def read_id(frame: Any) -> int:
    """The id stamped by :func:`stamp_id`, from the centres of the blocks."""
    q = ID_BLOCK // 4
    strip = frame[q : ID_BLOCK - q, : ID_BITS * ID_BLOCK]
    blocks = strip.reshape(strip.shape[0], ID_BITS, ID_BLOCK, -1)[:, :, q : ID_BLOCK - q]
    means = blocks.mean(axis=(0, 2, 3))
    fid = 0
    for m in means:
        fid = (fid << 1) | int(m > 127.5)
    return fid


def encode(frame: Any) -> Any:
    import simplejpeg

    return simplejpeg.encode_jpeg(
        frame, quality=QUALITY, colorspace="BGR", colorsubsampling=SUBSAMPLING
    )


def decode(buf: Any) -> Any:
    import simplejpeg

    return simplejpeg.decode_jpeg(buf, colorspace="BGR")


def _check_last(img: Any) -> None:
    import numpy as np

    if img is None or tuple(img.shape) != SHAPE:
        raise BenchCheckFailed(f"last frame: shape {getattr(img, 'shape', None)}, not {SHAPE}")
    want = last_frame()
    err = float(np.abs(img[64::4, ::4].astype(np.int16) - want[64::4, ::4]).mean())
    if err > MAX_MEAN_ERROR:
        raise BenchCheckFailed(f"last frame: mean pixel error {err:.1f} (channel order?)")


# -- library endpoints: a sender sends one frame, a receiver returns the next one decoded ----


def _zmq_port(sock: Any) -> int:
    import zmq

    return int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])


class SEOut:
    """socketengine sender: ``Client.write_image(frame, codec="jpeg", quality=90)``."""

    def __init__(self, params: Dict[str, Any], port: Optional[int]) -> None:
        from socketengine import Client

        if port is None:
            raise ValueError("the socketengine sender connects: it needs the host's port")
        self.client = Client(port=port, timeout=params["timeout"], connect_timeout=10)
        self.port: Optional[int] = None
        # conflate=False: the lossless mode (every frame, backpressure), the one to
        # compare with imagezmq's REQ/REP
        self.conflate = bool(params.get("conflate", True))

    def send(self, frame: Any) -> None:
        self.client.write_image(
            frame, CHANNEL, codec="jpeg", quality=QUALITY, conflate=self.conflate
        )

    def close(self) -> None:
        self.client.close()


class SEIn:
    """socketengine receiver (binds).  ``mode="every"``: ``host.subscribe("image")``,
    every frame that arrives; ``mode="newest"``: ``host.get("image")``, the newest frame,
    or ``host.wait("image")`` for the next one when the newest was already returned."""

    def __init__(self, params: Dict[str, Any], port: Optional[int]) -> None:
        from socketengine import Host

        self.host = Host(port=0, timeout=5)
        self.port: Optional[int] = self.host.port
        self.every = params["mode"] == "every"
        self.sub = self.host.subscribe(CHANNEL) if self.every else None
        self.last_id = -1

    def next(self, timeout: float) -> Any:
        if self.sub is not None:
            try:
                img, _conn = self.sub.get(timeout=timeout)
            except TimeoutError:
                return None
            return img
        img = self.host.get(CHANNEL)
        if img is not None:
            fid = read_id(img)
            if fid != self.last_id:
                self.last_id = fid
                return img
        try:
            img, _conn = self.host.wait(CHANNEL, timeout=timeout)
        except TimeoutError:
            return None
        self.last_id = read_id(img)
        return img

    def done(self) -> None:
        pass

    def discard(self, timeout: float) -> bool:
        """Take one queued frame without decoding it (none are ever queued here)."""
        return False

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
        self.host.close()


class IzmqOut:
    """imagezmq ``ImageSender``: REQ (connects to the hub) or PUB (binds)."""

    def __init__(self, params: Dict[str, Any], port: Optional[int], reqrep: bool = True) -> None:
        import imagezmq
        import zmq

        if reqrep:
            self.sender = imagezmq.ImageSender(connect_to=f"tcp://{LOCALHOST}:{port}")
        else:
            self.sender = imagezmq.ImageSender(connect_to=f"tcp://{LOCALHOST}:*", REQ_REP=False)
        sock = self.sender.zmq_socket
        sock.setsockopt(zmq.LINGER, 0)
        # Bounded: a REQ waiting for a reply that never comes raises zmq.Again.
        sock.setsockopt(zmq.RCVTIMEO, int(1000 * params["timeout"]))
        sock.setsockopt(zmq.SNDTIMEO, int(1000 * params["timeout"]))
        self.port = None if reqrep else _zmq_port(sock)

    def send(self, frame: Any) -> None:
        self.sender.send_jpg(SENDER_NAME, encode(frame))

    def close(self) -> None:
        self.sender.close()


class IzmqPubOut(IzmqOut):
    def __init__(self, params: Dict[str, Any], port: Optional[int]) -> None:
        super().__init__(params, port, reqrep=False)


class IzmqIn:
    """imagezmq ``ImageHub``: REP (binds ``tcp://127.0.0.1:*``) or SUB (connects)."""

    def __init__(self, params: Dict[str, Any], port: Optional[int], reqrep: bool = True) -> None:
        import imagezmq
        import zmq

        self.reqrep = reqrep
        if reqrep:
            self.hub = imagezmq.ImageHub(open_port=f"tcp://{LOCALHOST}:*")
        else:
            self.hub = imagezmq.ImageHub(open_port=f"tcp://{LOCALHOST}:{port}", REQ_REP=False)
        sock = self.hub.zmq_socket
        sock.setsockopt(zmq.LINGER, 0)
        self.port = _zmq_port(sock) if reqrep else None
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)

    def _recv(self, timeout: float) -> Any:
        if not self.poller.poll(int(1000 * timeout)):
            return None
        _name, jpg_buffer = self.hub.recv_jpg()
        return jpg_buffer

    def next(self, timeout: float) -> Any:
        buf = self._recv(timeout)
        return None if buf is None else decode(buf)

    def done(self) -> None:
        if self.reqrep:
            self.hub.send_reply(b"OK")

    def discard(self, timeout: float) -> bool:
        if self._recv(timeout) is None:
            return False
        self.done()
        return True

    def close(self) -> None:
        self.hub.close()


class IzmqSubIn(IzmqIn):
    def __init__(self, params: Dict[str, Any], port: Optional[int]) -> None:
        super().__init__(params, port, reqrep=False)


SENDERS: Dict[str, Any] = {SE: SEOut, IZMQ: IzmqOut, IZMQ_PS: IzmqPubOut}
RECEIVERS: Dict[str, Any] = {SE: SEIn, IZMQ: IzmqIn, IZMQ_PS: IzmqSubIn}
#: Which side binds: imagezmq's PUB/SUB binds on the sender, everything else on the receiver.
SENDER_BINDS = {SE: False, IZMQ: False, IZMQ_PS: True}


# -- throughput -------------------------------------------------------------------------------


class ThroughputReceiver:
    """Receives, decodes and counts frames in a background thread."""

    def __init__(self, lib: str, params: Dict[str, Any], port: Optional[int]) -> None:
        self.engine = RECEIVERS[lib](dict(params, mode="every"), port)
        self.port = self.engine.port
        last_frame()  # build the reference now, not while timing
        self.count = 0
        self.t_end = 0.0
        self.last_img: Any = None
        self.error: Optional[BaseException] = None
        self.warm = threading.Event()
        self.last = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="jpeg-recv", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self.stop:
                img = engine.next(0.1)
                if img is None:
                    continue
                fid = read_id(img)
                engine.done()
                if fid == WARM_ID:
                    self.warm.set()
                    continue
                self.count += 1
                if fid == LAST_ID:
                    self.t_end = now()
                    self.last_img = img
                    self.last.set()
        except BaseException as exc:
            if not self.stop:
                self.error = exc
                self.warm.set()
                self.last.set()

    def ready(self, timeout: float) -> bool:
        self.warm.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.warm.is_set()

    def measure(self, n: int, deadline: float) -> Dict[str, Any]:
        if not self.last.wait(left(deadline)):
            raise BenchTimeout(f"the last JPEG frame did not arrive ({self.count} did)")
        if self.error is not None:
            raise self.error
        _check_last(self.last_img)
        return {"t_end": self.t_end, "delivered": self.count}

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        close_quietly(self.engine)


class ThroughputSender:
    def __init__(self, lib: str, params: Dict[str, Any], port: Optional[int]) -> None:
        self.engine = SENDERS[lib](params, port)
        self.port = self.engine.port
        self.pool = frame_pool()
        self.warm = warm_frame()
        self.last = last_frame()

    def warmup(self) -> None:
        self.engine.send(self.warm)

    def go(self, n: int) -> Dict[str, Any]:
        if n - 1 > WARM_ID:
            raise ValueError(f"at most {WARM_ID + 1} frames per run")
        send = self.engine.send
        pool = self.pool
        t0 = now()
        for i in range(n - 1):
            frame = pool[i % POOL]
            stamp_id(frame, i)
            send(frame)
        send(self.last)
        return {"t0": t0, "t_sent": now()}

    def close(self) -> None:
        self.engine.close()


def _connect_pair(
    lib: str, sender_cls: Any, receiver_cls: Any, params: Dict[str, Any], xproc: bool
) -> Tuple[Any, Any]:
    """Build (sender, receiver), the binding side first; in child processes if ``xproc``."""

    def make(cls: Any, port: Optional[int]) -> Any:
        if xproc:
            return Remote(cls, (lib, params, port), timeout=params["timeout"] + 30)
        return cls(lib, params, port)

    s = r = None
    try:
        if SENDER_BINDS[lib]:
            s = make(sender_cls, None)
            r = make(receiver_cls, s.port)
        else:
            r = make(receiver_cls, None)
            s = make(sender_cls, r.port)
    except BaseException:
        _close(xproc, s, r)
        raise
    return s, r


def _close(xproc: bool, *objs: Any) -> None:
    if xproc:
        shutdown_all(*objs)
    else:
        close_quietly(*objs)


def _warm_up(s: Any, r: Any, xproc: bool, timeout: float) -> None:
    """Send warm-up frames until the receiver has decoded one (a SUB socket joins late:
    PUB drops what it sends before the subscription is in place)."""
    deadline = deadline_in(timeout)
    while now() < deadline:
        if xproc:
            s.send("warmup")
            ok = r.call("ready", 0.2, timeout=timeout)
            s.result(timeout)
        else:
            s.warmup()
            ok = r.ready(0.2)
        if ok:
            return
    raise BenchTimeout("the receiver never got a warm-up frame")


def throughput_trial(
    lib: str, n: int, xproc: bool, timeout: float, conflate: bool = True
) -> Dict[str, float]:
    params: Dict[str, Any] = {"timeout": timeout, "conflate": conflate}
    s, r = _connect_pair(lib, ThroughputSender, ThroughputReceiver, params, xproc)
    try:
        _warm_up(s, r, xproc, timeout)
        if xproc:
            r.send("measure", n, deadline_in(timeout))
            s.send("go", n)
            sres = s.result(timeout + 5)
            rres = r.result(timeout + 5)
        else:
            sres = s.go(n)
            rres = r.measure(n, deadline_in(timeout))
    finally:
        _close(xproc, s, r)
    elapsed = rres["t_end"] - sres["t0"]
    delivered = rres["delivered"]
    return {
        "fps": delivered / elapsed,
        "delivered_pct": 100.0 * delivered / n,
        "last_frame_ms": 1000.0 * elapsed,
        "sender_pct": 100.0 * (sres["t_sent"] - sres["t0"]) / elapsed,
    }


# -- slow receiver ----------------------------------------------------------------------------


class CameraSender:
    """Sends the camera's current frame at each tick of a fixed-rate clock.  A send that
    blocks (REQ/REP) makes it miss ticks: a camera does not queue the frames it could
    not send, the next frame is the one of the current tick."""

    def __init__(self, lib: str, params: Dict[str, Any], port: Optional[int]) -> None:
        self.engine = SENDERS[lib](params, port)
        self.port = self.engine.port
        self.pool = frame_pool()
        self.warm = warm_frame()

    def warmup(self) -> None:
        self.engine.send(self.warm)

    def run(self, t_start: float, t_stop: float, fps: float) -> Dict[str, Any]:
        send = self.engine.send
        captured: Dict[int, float] = {}
        tick = 0
        time.sleep(max(0.0, t_start - now()))
        while True:
            t_tick = t_start + tick / fps
            if t_tick >= t_stop or tick >= WARM_ID:
                break
            pause = t_tick - now()
            if pause > 0:
                time.sleep(pause)
            frame = self.pool[tick % POOL]
            stamp_id(frame, tick)
            captured[tick] = now()
            send(frame)
            tick = max(tick + 1, math.ceil((now() - t_start) * fps))
        return {"captured": captured, "t_end": now()}

    def close(self) -> None:
        self.engine.close()


class SlowReceiver:
    """Takes a frame, decodes it, then works on it for ``work_s`` seconds."""

    def __init__(self, lib: str, params: Dict[str, Any], port: Optional[int]) -> None:
        self.engine = RECEIVERS[lib](dict(params, mode="newest"), port)
        self.port = self.engine.port

    def ready(self, timeout: float) -> bool:
        img = self.engine.next(timeout)
        if img is None:
            return False
        fid = read_id(img)
        self.engine.done()
        return fid == WARM_ID

    def run(self, t_stop: float, work_s: float, deadline: float) -> Dict[str, Any]:
        engine = self.engine
        handled: List[Tuple[float, int]] = []
        while now() < t_stop:
            img = engine.next(max(0.01, min(0.2, t_stop - now())))
            if img is None:
                continue
            t = now()  # the frame is pixels in the application's hands
            fid = read_id(img)
            if fid >= WARM_ID:
                engine.done()
                continue
            handled.append((t, fid))
            time.sleep(work_s)  # the application's work on this frame
            engine.done()
        # Frames still queued for this receiver (answered, for REQ/REP, so the camera's
        # last send returns).
        backlog = 0
        while now() < deadline and backlog <= WARM_ID and engine.discard(0.3):
            backlog += 1
        return {"handled": handled, "backlog": backlog}

    def close(self) -> None:
        self.engine.close()


def _median(xs: List[float]) -> Optional[float]:
    if not xs:
        return None
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def slow_receiver_trial(
    lib: str, duration: float, fps: float, work_s: float, timeout: float
) -> Dict[str, Any]:
    params = {"timeout": timeout}
    s, r = _connect_pair(lib, CameraSender, SlowReceiver, params, True)
    try:
        _warm_up(s, r, True, timeout)
        t_start = now() + 0.3
        t_stop = t_start + duration
        r.send("run", t_stop, work_s, t_stop + timeout)
        s.send("run", t_start, t_stop, fps)
        sres = s.result(duration + timeout + 5)
        rres = r.result(duration + timeout + 5)
    finally:
        shutdown_all(s, r)
    captured: Dict[int, float] = sres["captured"]
    series: List[List[float]] = []
    for t, fid in rres["handled"]:
        if fid not in captured:
            raise BenchCheckFailed(f"received frame id {fid}, which was never sent")
        series.append([round(t - t_start, 4), round(1000.0 * (t - captured[fid]), 2)])
    window = min(1.0, duration / 4)
    first = [a for t, a in series if t < window]
    last = [a for t, a in series if t >= duration - window]
    if not first or not last:
        raise BenchCheckFailed(
            f"no frame handled in the first or last {window:g} s ({len(series)} in all)"
        )
    age_first = _median(first)
    age_last = _median(last)
    assert age_first is not None and age_last is not None
    return {
        "age_last_ms": age_last,
        "age_last_max_ms": max(last),
        "age_first_ms": age_first,
        "age_growth_ms": age_last - age_first,
        "send_fps": len(captured) / duration,
        "handled_fps": len(series) / duration,
        "backlog_end": float(rres["backlog"]),
        "series": series,
    }
