"""Does compressing a value pay?  End to end over a bandwidth-limited loopback link.

    python -m bench.compression                       # 100 Mbit/s and 1 Gbit/s, 5 runs
    python -m bench.compression --rates 100 --runs 3
    python -m bench.compression --rates 0             # 0: plain loopback, no relay

A :class:`PacedRelay` sits between a sender and a receiver on 127.0.0.1 and forwards the
sender's bytes at a fixed bit rate (store and forward, 16 KiB at most at a time, like a
Wi-Fi link to a robot); the receiver's one-byte acknowledgements come back unpaced.
socketengine cannot compress on the wire yet, so the sender frames the payload itself
(``<B codec, Q wire length, Q original length>`` + bytes) on a raw TCP socket: the time
measured is what the wired feature will add or save.

One measurement: ``t0``; compress (socketengine.compression); ``sendall``; the receiver
reads the frame, decompresses it (``max_size`` 64 MiB), checks its length, sends the ack;
the sender has the ack: ``t1``.  Every figure is the median of ``--runs`` runs (each run
the median of ``--repeat`` messages), with min-max of the runs.  The first message of
every run is checked byte for byte.

Payloads (``payloads()``):

* ``depth 1mm``: a 480x640 float32 depth map in metres as a depth camera gives it (a
  uint16 millimetre image scaled by 0.001): floor, wall and boxes, noise growing with
  distance, zeros for invalid pixels (stereo shadow band, holes, out of range);
* ``depth float``: the same scene with unquantised noise (a filtered or fused map):
  every mantissa differs;
* ``points``: the valid pixels of ``depth float`` deprojected to an N x 3 float32 cloud;
* ``telemetry``: a large msgpack'd robot status (joints, diagnostics, logs);
* ``random``: incompressible bytes, standing for JPEG/PNG images or encrypted data.

``--threshold`` also sends telemetry of 256 B .. 64 KiB (``--repeat`` x 4 messages) to
see where compression starts paying: the basis of ``compression.DEFAULT_THRESHOLD``.

Everything binds 127.0.0.1 port 0; the relay accepts one connection, every socket has a
timeout, and the relay's threads end when either side closes or after ``lifetime`` s.
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from socketengine import compression

HEADER = struct.Struct("<BQQ")
CODEC_IDS = {"raw": 0, "zstd": 1, "lz4": 2}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
MAX_SIZE = 64 << 20
CHUNK = 16 * 1024
# (label, codec, level)
METHODS: List[Tuple[str, str, Optional[int]]] = [
    ("raw", "raw", None),
    ("zstd-1", "zstd", 1),
    ("zstd-3", "zstd", 3),
    ("lz4", "lz4", 0),
]


# -- the link ---------------------------------------------------------------------------------


class PacedRelay:
    """Forwards one TCP connection to ``127.0.0.1:dest_port``, the forward direction paced to
    ``mbit`` Mbit/s (store and forward per chunk); the reverse direction is not paced.

    Bounded: accepts a single connection within 30 s, every socket times out after 30 s of
    silence, and the threads stop after ``lifetime`` seconds whatever happens.
    """

    def __init__(self, dest_port: int, mbit: float, lifetime: float = 600.0) -> None:
        self.rate = mbit * 1e6
        self.dest_port = dest_port
        self.stop_at = time.monotonic() + lifetime
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.socks: List[socket.socket] = []
        self.thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            a, _ = self.listener.accept()
        except OSError:
            return
        finally:
            self.listener.close()
        b = socket.create_connection(("127.0.0.1", self.dest_port), timeout=30)
        for s in (a, b):
            s.settimeout(30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks = [a, b]
        back = threading.Thread(target=self._pump, args=(b, a, 0.0), daemon=True)
        back.start()
        self._pump(a, b, self.rate)
        back.join(30)

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        if not rate:
            self._copy(src, dst)
            return
        # A reader thread stamps each chunk with its arrival time; this thread puts it on
        # the "air" from max(arrival, link free) until its last bit is through, then
        # forwards it.  The schedule, not the (late) wake-ups, sets the next start, so
        # sleep overshoot does not lower the rate, and an idle link gives no credit.
        chunks: queue.Queue[Tuple[float, bytes]] = queue.Queue(maxsize=256)  # <= 4 MiB
        reader = threading.Thread(target=self._read, args=(src, chunks), daemon=True)
        reader.start()
        next_free = 0.0
        try:
            while time.monotonic() < self.stop_at:
                arrival, data = chunks.get(timeout=30)
                if not data:
                    break
                next_free = max(arrival, next_free) + len(data) * 8 / rate
                delay = next_free - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                dst.sendall(data)
        except (OSError, queue.Empty):
            pass
        finally:
            _shutdown(src, dst)
        reader.join(30)

    def _read(self, src: socket.socket, chunks: queue.Queue[Tuple[float, bytes]]) -> None:
        data = b""
        try:
            while time.monotonic() < self.stop_at:
                data = src.recv(CHUNK)
                chunks.put((time.perf_counter(), data), timeout=30)
                if not data:
                    return
        except (OSError, queue.Full):
            pass
        if data:  # stopped on an error: tell the pacer
            try:
                chunks.put((time.perf_counter(), b""), timeout=30)
            except queue.Full:
                pass

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while time.monotonic() < self.stop_at:
                data = src.recv(CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(src, dst)

    def close(self) -> None:
        """Wait for the threads (they end when the sender closes), then close the sockets.

        Closing a socket does not wake a thread blocked in ``recv`` on it: shut down
        first, close last.
        """
        self.thread.join(30)
        _shutdown(*self.socks)
        for s in self.socks:
            s.close()


def _shutdown(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed")
        got += k
    return out


class Receiver:
    """Reads frames, decompresses them, acks each with one byte; records decode times."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.decode_s: List[float] = []
        self.last: bytes = b""
        self.keep = threading.Event()
        self.thread = threading.Thread(target=self._run, name="receiver", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        finally:
            self.listener.close()
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    head = recv_exact(conn, HEADER.size)
                except (ConnectionError, OSError):
                    return
                codec_id, wire_len, size = HEADER.unpack(head)
                data = recv_exact(conn, wire_len)
                t = time.perf_counter()
                codec = CODEC_NAMES[codec_id]
                value = data if codec == "raw" else compression.decompress(codec, data, MAX_SIZE)
                self.decode_s.append(time.perf_counter() - t)
                if len(value) != size:
                    raise RuntimeError(f"{codec}: {len(value)} bytes, expected {size}")
                if self.keep.is_set():
                    self.last = bytes(value)
                conn.sendall(b"\x01")


class Link:
    """A sender socket to a Receiver, through a PacedRelay unless ``mbit`` is 0."""

    def __init__(self, mbit: float) -> None:
        self.receiver = Receiver()
        self.relay = PacedRelay(self.receiver.port, mbit) if mbit else None
        port = self.relay.port if self.relay else self.receiver.port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes, codec: str, level: Optional[int]) -> Tuple[float, float, int]:
        """(end-to-end s, compress s, wire bytes) of one message."""
        t0 = time.perf_counter()
        if codec == "raw":
            wire: bytes = payload
        else:
            wire = compression.compress(codec, payload, level)
        t1 = time.perf_counter()
        self.sock.sendall(HEADER.pack(CODEC_IDS[codec], len(wire), len(payload)))
        self.sock.sendall(wire)
        if recv_exact(self.sock, 1) != b"\x01":
            raise RuntimeError("bad ack")
        return time.perf_counter() - t0, t1 - t0, len(wire)

    def close(self) -> None:
        self.sock.close()
        if self.relay:
            self.relay.close()
        self.receiver.thread.join(30)


# -- payloads ---------------------------------------------------------------------------------


def depth_scene(rng: np.random.Generator, quantised: bool) -> np.ndarray:
    """480x640 float32 metres: floor, back wall, two boxes, noise, invalid pixels = 0."""
    h, w = 480, 640
    fx = fy = 525.0
    cx, cy = 319.5, 239.5
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    ray_y = (v - cy) / fy
    ray_x = (u - cx) / fx
    z = np.full((h, w), 4.5)  # back wall
    cam_height = 0.8
    with np.errstate(divide="ignore"):
        floor = np.where(ray_y > 0, cam_height / ray_y, np.inf)
    z = np.minimum(z, floor)
    box1 = (np.abs(ray_x * 2.0 - 0.3) < 0.35) & (ray_y * 2.0 > -0.2) & (ray_y * 2.0 < 0.8)
    z = np.where(box1, np.minimum(z, 2.0 + 0.15 * ray_x), z)
    box2 = (np.abs(ray_x * 3.0 + 1.2) < 0.4) & (ray_y * 3.0 > 0.1) & (ray_y * 3.0 < 2.4)
    z = np.where(box2, np.minimum(z, 3.0 - 0.2 * ray_y), z)
    z = z + rng.normal(0.0, 1.0, z.shape) * (0.0015 * z * z)  # stereo noise ~ z^2
    z[:, :40] = 0  # stereo shadow band on the left
    holes = rng.random((h // 16, w // 16)) < 0.04
    z[np.kron(holes, np.ones((16, 16), dtype=bool))] = 0
    z[rng.random(z.shape) < 0.02] = 0  # speckle dropouts
    z[z > 6.0] = 0
    if quantised:
        z = np.round(z * 1000.0) / 1000.0  # a uint16 millimetre image, in metres
    return z.astype(np.float32)


def point_cloud(depth: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    valid = depth > 0
    z = depth[valid]
    x = (u[valid] - 319.5) / 525.0 * z
    y = (v[valid] - 239.5) / 525.0 * z
    return np.ascontiguousarray(np.stack([x, y, z], axis=1).astype(np.float32))


def telemetry(rng: np.random.Generator, n_diag: int) -> Dict[str, Any]:
    joints = {
        f"arm_joint_{i}": {
            "position": float(rng.normal()),
            "velocity": float(rng.normal() * 0.1),
            "effort": float(rng.normal() * 3),
            "temperature": round(float(35 + rng.normal()), 1),
            "mode": "position",
            "fault": False,
        }
        for i in range(12)
    }
    diagnostics = [
        {
            "name": f"/robot/{['drive', 'arm', 'sensors', 'power'][i % 4]}/node_{i}",
            "hardware_id": f"hw-{i % 37:04d}",
            "level": int(rng.integers(0, 2)),
            "message": "OK" if i % 9 else "Frequency below target",
            "values": {
                "frequency_hz": round(float(rng.uniform(9, 31)), 2),
                "cpu_percent": round(float(rng.uniform(0, 100)), 1),
                "uptime_s": int(rng.integers(0, 10**6)),
            },
        }
        for i in range(n_diag)
    ]
    return {
        "stamp": time.time(),
        "battery": {"voltage": 24.1, "current": -3.2, "percent": 81, "charging": False},
        "pose": {"x": 1.25, "y": -0.5, "theta": 0.33, "frame": "map"},
        "joints": joints,
        "diagnostics": diagnostics,
        "log": [
            f"[INFO] [{1700000000 + i}] planner: replanned path, {i} waypoints"
            for i in range(n_diag // 4)
        ],
    }


def payloads(seed: int = 7) -> Dict[str, bytes]:
    rng = np.random.default_rng(seed)
    depth_float = depth_scene(rng, quantised=False)
    return {
        "depth 1mm": depth_scene(rng, quantised=True).tobytes(),
        "depth float": depth_float.tobytes(),
        "points": point_cloud(depth_float).tobytes(),
        "telemetry": msgpack.packb(telemetry(rng, 1500)),
        "random": os.urandom(256 * 1024),
    }


def telemetry_of_size(nbytes: int, seed: int = 3) -> bytes:
    """msgpack'd telemetry of at most ``nbytes``: a status with as many diagnostics as fit."""
    full = telemetry(np.random.default_rng(seed), 2000)
    base = {"stamp": full["stamp"], "battery": full["battery"], "pose": full["pose"]}
    lo, hi = 0, len(full["diagnostics"])
    best: bytes = msgpack.packb(base)
    while lo <= hi:
        mid = (lo + hi) // 2
        blob = msgpack.packb({**base, "diagnostics": full["diagnostics"][:mid]})
        if len(blob) <= nbytes:
            best, lo = blob, mid + 1
        else:
            hi = mid - 1
    return best


# -- measurement ------------------------------------------------------------------------------


def measure(
    link: Link, payload: bytes, codec: str, level: Optional[int], repeat: int
) -> Dict[str, float]:
    link.receiver.keep.set()
    e2e, comp = [], []
    dec_before = len(link.receiver.decode_s)
    wire = 0
    for i in range(repeat):
        t, c, wire = link.send(payload, codec, level)
        if i == 0:
            if link.receiver.last != payload:
                raise RuntimeError(f"{codec}: payload changed on the way")
            link.receiver.keep.clear()
        e2e.append(t)
        comp.append(c)
    dec = link.receiver.decode_s[dec_before:]
    return {
        "e2e_ms": statistics.median(e2e) * 1e3,
        "compress_ms": statistics.median(comp) * 1e3,
        "decompress_ms": statistics.median(dec) * 1e3 if dec else 0.0,
        "wire": float(wire),
    }


def summarise(values: Sequence[float]) -> Tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_table(
    mbit: float, cases: Dict[str, bytes], runs: int, repeat: int, methods: Sequence[Any]
) -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    """results[payload][method][metric] = one value per run."""
    results: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    link = Link(mbit)
    try:
        for payload in cases.values():  # warm up the link, the caches and the codecs
            for _, codec, level in methods:
                measure(link, payload, codec, level, 1)
        for run in range(runs):
            order = list(methods)
            order = order[run % len(order) :] + order[: run % len(order)]  # rotate
            for name, payload in cases.items():
                for label, codec, level in order:
                    m = measure(link, payload, codec, level, repeat)
                    slot = results.setdefault(name, {}).setdefault(label, {})
                    for k, v in m.items():
                        slot.setdefault(k, []).append(v)
    finally:
        link.close()
    return results


def print_table(
    title: str,
    cases: Dict[str, bytes],
    results: Dict[str, Dict[str, Dict[str, List[float]]]],
    methods: Sequence[Any],
    runs: int,
) -> None:
    print(f"\n### {title}\n")
    print(f"end-to-end ms per message, median of {runs} runs [min-max]; x = raw / method\n")
    print("| payload | size | method | wire | ratio | compress ms | decompress ms | e2e ms | x |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, payload in cases.items():
        raw = statistics.median(results[name]["raw"]["e2e_ms"])
        for label, _, _ in methods:
            r = results[name][label]
            med, lo, hi = summarise(r["e2e_ms"])
            wire = statistics.median(r["wire"])
            print(
                f"| {name} | {len(payload) / 1024:,.0f} KiB | {label} | {wire / 1024:,.0f} KiB"
                f" | {len(payload) / wire:.2f} | {statistics.median(r['compress_ms']):.2f}"
                f" | {statistics.median(r['decompress_ms']):.2f}"
                f" | {med:.2f} [{lo:.2f}-{hi:.2f}] | {raw / med:.2f} |"
            )


def print_threshold(
    mbit: float,
    results: Dict[str, Dict[str, Dict[str, List[float]]]],
    cases: Dict[str, bytes],
    methods: Sequence[Any],
) -> None:
    link = f"{mbit:g} Mbit/s" if mbit else "loopback"
    print(f"\n### small telemetry, {link}: end-to-end ms (median) and x = raw / method\n")
    print("| size | " + " | ".join(f"{label} (wire)" for label, _, _ in methods) + " |")
    print("|---:|" + "---:|" * len(methods))
    for name, payload in cases.items():
        raw = statistics.median(results[name]["raw"]["e2e_ms"])
        cells = []
        for label, _, _ in methods:
            med = statistics.median(results[name][label]["e2e_ms"])
            wire = statistics.median(results[name][label]["wire"])
            cells.append(f"{med:.3f} x{raw / med:.2f} ({wire:,.0f} B)")
        print(f"| {len(payload):,} B | " + " | ".join(cells) + " |")


def cpu_us(fn: Any, number: int = 200) -> float:
    """Median over 5 batches of the per-call CPU time of ``fn()`` (this thread's), in us."""
    times = []
    for _ in range(5):
        t = time.thread_time()
        for _ in range(number):
            fn()
        times.append((time.thread_time() - t) / number)
    return statistics.median(times) * 1e6


def print_break_even(cases: Dict[str, bytes], rates: Sequence[float]) -> None:
    """CPU cost of compress + decompress against the link time the smaller wire saves."""
    print("\n### small telemetry: CPU cost vs link time saved (us, median of 5 batches)\n")
    heads = ["size"]
    for label in ("zstd-1", "lz4"):
        heads += [f"{label} wire", f"{label} cpu"] + [f"{label} saved @{r:g}M" for r in rates]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---:|" * len(heads))
    for payload in cases.values():
        n = len(payload)
        cells = [f"{n:,} B"]
        for codec in ("zstd", "lz4"):
            level = 1 if codec == "zstd" else 0
            wire = compression.compress(codec, payload, level)

            def both(codec: str = codec, level: int = level, data: bytes = payload) -> None:
                compression.decompress(codec, compression.compress(codec, data, level), len(data))

            cpu = cpu_us(both)
            cells += [f"{len(wire):,} B", f"{cpu:.0f}"]
            cells += [f"{(n - len(wire)) * 8 / r:.0f}" for r in rates]
        print("| " + " | ".join(cells) + " |")


def main(argv: Sequence[str] = ()) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="100,1000", help="Mbit/s, comma-separated; 0 = no relay")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=5, help="messages per run (median)")
    ap.add_argument("--threshold", action="store_true", help="also small telemetry sizes")
    args = ap.parse_args(list(argv) or None)
    cases = payloads()
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    for rate in [float(r) for r in args.rates.split(",")]:
        title = f"{rate:g} Mbit/s paced relay" if rate else "loopback, no relay"
        results = run_table(rate, cases, args.runs, args.repeat, METHODS)
        print_table(title, cases, results, METHODS, args.runs)
        if args.threshold:
            small = {
                str(n): telemetry_of_size(n)
                for n in (256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
            }
            methods = [m for m in METHODS if m[0] != "zstd-3"]
            res = run_table(rate, small, args.runs, args.repeat * 4, methods)
            print_threshold(rate, res, small, methods)
    if args.threshold:
        small = {
            str(n): telemetry_of_size(n) for n in (256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
        }
        print_break_even(small, (100.0, 1000.0))


if __name__ == "__main__":
    main()
