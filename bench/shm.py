"""Shared memory on one machine: 1080p frames between two processes.

    python -m bench.shm                     # 3 rounds, every library, medians
    python -m bench.shm --rounds 5 --frames 200 --only se,se_socket,raw

Two workloads, each library in turn, the order rotating from round to round:

* ``arrays``: the sender ``write``s N 1080x1920x3 uint8 frames back to back (every frame
  is delivered: nothing conflates); the receiver, in another process, takes every frame
  as an array it may keep.  GB/s from the sender's first write to the receiver holding
  the last frame.
* ``camera``: a 30 fps camera sends 1080p frames stamped with ``time.monotonic_ns()``
  (CLOCK_MONOTONIC, system-wide); the reader polls for the newest frame every 50 us and
  records its age when it gets it.  p50 / p99 in ms.

Libraries: ``se`` (socketengine, shared memory on: the default, one copy out of the
slot), ``se_lease`` (the measured alternative: the receiver's array *is* the slot,
``shm.LEASE = True``), ``se_socket``
(``shm=False``: TCP loopback), ``raw`` (a raw TCP socket: ``sendall`` of an 8-byte
length + the frame, ``recv_into`` a preallocated buffer), ``iceoryx2`` (publish-subscribe
of a byte slice, ``RetryUntilDelivered`` for ``arrays``, the receiver copies each sample
out so that it may keep it, as socketengine's receiver does) and ``zenoh`` (``eclipse-
zenoh`` shared-memory buffers, ``put`` of a ``ZShmMut``, the subscriber copies out).
The anchors are skipped with a message when their package is missing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from typing import Any, Callable, Dict, List

SHAPE = (1080, 1920, 3)
NBYTES = SHAPE[0] * SHAPE[1] * SHAPE[2]
WARM = 5
DEADLINE = 120.0


def _frame(i: int) -> Any:
    import numpy as np

    # Backed by a bytearray: zenoh's shared-memory buffers accept only bytes/bytearray.
    raw = bytearray(NBYTES)
    f = np.frombuffer(raw, np.uint8).reshape(SHAPE)
    f[...] = i % 251
    f.reshape(-1)[:8] = np.frombuffer(struct.pack("<q", i), np.uint8)
    _BACKING[id(f)] = raw
    return f


_BACKING: Dict[int, bytearray] = {}
LAST = 1 << 40


def _stamp(buf: Any) -> int:
    return int(struct.unpack_from("<q", memoryview(buf).cast("B"), 0)[0])


def _wait(cond: Callable[[], Any], what: str, sleep: float = 0.0001) -> Any:
    end = time.monotonic() + DEADLINE
    while True:
        r = cond()
        if r:
            return r
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(sleep)


# -- receivers (child process): report through `out` ------------------------------------------


def _recv_se(kind: str, n: int, shm: Any, ready: Any, out: Any) -> None:
    from socketengine import Host
    from socketengine import shm as shm_module

    shm_module.LEASE = shm == "lease"  # the measured alternative: zero-copy leased slots
    h = Host(port=0, shm=bool(shm))
    ready.put(h.port)
    try:
        if kind == "arrays":
            _wait(lambda: h.get("f") is not None and _stamp(h.get("f")) == LAST, "last frame")
            out.put({"t_end": time.monotonic()})
        else:
            out.put({"ages": _poll_newest(lambda: h.get("cam"), n)})
    finally:
        h.close()


def _poll_newest(get: Callable[[], Any], n: int) -> List[float]:
    ages: List[float] = []
    seen = -1
    warm = True
    end = time.monotonic() + DEADLINE
    while len(ages) < n and time.monotonic() < end:
        v = get()
        if v is not None:
            s = _stamp(v)
            if s != seen:
                ages.append((time.monotonic_ns() - s) / 1e6)
                seen = s
                if len(ages) == 5 and warm:
                    ages, warm = [], False  # the first frames meet cold caches: not counted
        time.sleep(0.00005)
    return ages


def _recv_raw(kind: str, n: int, shm: bool, ready: Any, out: Any) -> None:
    import numpy as np

    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    ready.put(lst.getsockname()[1])
    conn, _ = lst.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(8)
    ages: List[float] = []
    total = WARM + n if kind == "arrays" else n
    for _ in range(total):
        buf = np.empty(NBYTES, np.uint8)  # a new array each frame: the receiver keeps it
        _recv_exact(conn, memoryview(head))
        _recv_exact(conn, memoryview(buf))
        if kind == "camera":
            ages.append((time.monotonic_ns() - _stamp(buf)) / 1e6)
    out.put({"t_end": time.monotonic()} if kind == "arrays" else {"ages": ages})
    conn.close()
    lst.close()


def _recv_exact(conn: socket.socket, view: memoryview) -> None:
    while view:
        k = conn.recv_into(view)
        if not k:
            raise ConnectionError("peer closed")
        view = view[k:]


def _iox_service(name: str, kind: str) -> Any:
    import ctypes

    import iceoryx2 as iox

    iox.set_log_level(iox.LogLevel.Error)
    node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
    builder = (
        node.service_builder(iox.ServiceName.new(name))
        .publish_subscribe(iox.Slice[ctypes.c_uint8])
        .subscriber_max_buffer_size(4)
    )
    if kind == "arrays":
        builder = builder.enable_safe_overflow(False)
    return node, builder.open_or_create()


def _recv_iox(kind: str, n: int, shm: bool, ready: Any, out: Any) -> None:
    import numpy as np

    name = f"socketengine-bench-{os.getpid()}"
    node, service = _iox_service(name, kind)
    sub = service.subscriber_builder().buffer_size(4).create()
    ready.put(name)

    def take() -> Any:
        sample = sub.receive()
        if sample is None:
            return None
        arr = np.frombuffer(sample.payload().as_memory_view(), np.uint8).copy()
        del sample
        return arr

    if kind == "arrays":
        last = LAST
        got = 0
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            a = take()
            if a is None:
                time.sleep(0.00005)
                continue
            got += 1
            if _stamp(a) == last:
                break
        out.put({"t_end": time.monotonic(), "got": got})
    else:
        latest: List[Any] = [None]

        def get() -> Any:
            while True:  # drain to the newest
                a = take()
                if a is None:
                    return latest[0]
                latest[0] = a

        out.put({"ages": _poll_newest(get, n)})
    sub = service = None  # ports before the node
    del node


def _zenoh_config(listen: bool, port: int) -> Any:
    import zenoh

    conf = zenoh.Config()
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "true")
    if listen:
        conf.insert_json5("listen/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    else:
        conf.insert_json5("connect/endpoints", json.dumps([f"tcp/127.0.0.1:{port}"]))
    return conf


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def _recv_zenoh(kind: str, n: int, shm: bool, ready: Any, out: Any) -> None:
    import threading

    import numpy as np
    import zenoh

    port = _free_port()
    session = zenoh.open(_zenoh_config(True, port))
    latest: List[Any] = [None]
    count = [0]
    done = threading.Event()
    last = LAST

    def on_sample(sample: Any) -> None:
        arr = np.frombuffer(memoryview(sample.payload.to_bytes()), np.uint8)
        latest[0] = arr
        count[0] += 1
        if kind == "arrays" and _stamp(arr) == last:
            done.set()

    sub = session.declare_subscriber("bench/frames", on_sample)
    ready.put(port)
    if kind == "arrays":
        done.wait(DEADLINE)
        out.put({"t_end": time.monotonic(), "got": count[0]})
    else:
        out.put({"ages": _poll_newest(lambda: latest[0], n)})
    sub.undeclare()
    session.close()


# -- senders (child process) ---------------------------------------------------------------------


def _send_loop(kind: str, n: int, send: Callable[[Any], None], out: Any) -> None:
    if kind == "arrays":
        # Never modified once written (a queued frame may still reference its array).
        pool = [_frame(i) for i in range(4)]
        last = _frame(LAST)
        for i in range(WARM):
            send(pool[i % 4])
        time.sleep(0.5)  # let the warm-up frames land before the clock starts
        t0 = time.monotonic()
        for i in range(n - 1):
            send(pool[i % 4])
        send(last)
        out.put({"t0": t0})
    else:
        pool = [_frame(i) for i in range(4)]
        period = 1 / 30
        nxt = time.monotonic()
        for i in range(n + 8):  # a few extra: the reader counts n after 5 warm-up frames
            f = pool[i % 4]  # written 4 frames (133 ms) ago: long sent
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))
            f.reshape(-1)[:8] = __import__("numpy").frombuffer(
                struct.pack("<q", time.monotonic_ns()), "uint8"
            )
            try:
                send(f)
            except OSError:
                break  # the reader has its n frames and left
        out.put({})


def _send_se(kind: str, n: int, shm: Any, addr: Any, out: Any) -> None:
    from socketengine import Client

    c = Client(port=addr, shm=bool(shm), timeout=30)
    try:
        if kind == "arrays":
            _send_loop(kind, n, lambda f: c.write("f", f), out)
        else:
            _send_loop(kind, n, lambda f: c.write_image(f, "cam"), out)
    finally:
        c.close()


def _send_raw(kind: str, n: int, shm: bool, addr: Any, out: Any) -> None:
    s = socket.create_connection(("127.0.0.1", addr))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = struct.pack("<Q", NBYTES)

    def send(f: Any) -> None:
        s.sendall(head)
        s.sendall(memoryview(f).cast("B"))

    _send_loop(kind, n, send, out)
    s.close()


def _send_iox(kind: str, n: int, shm: bool, addr: Any, out: Any) -> None:
    import iceoryx2 as iox
    import numpy as np

    node, service = _iox_service(addr, kind)
    builder = service.publisher_builder().initial_max_slice_len(NBYTES)
    if kind == "arrays":
        builder = builder.backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
    pub = builder.create()
    time.sleep(0.2)  # the subscriber exists already; let the publisher connect

    def send(f: Any) -> None:
        sample = pub.loan_slice_uninit(NBYTES)
        np.frombuffer(sample.payload().as_memory_view(), np.uint8)[:] = f.reshape(-1)
        sample.assume_init().send()

    _send_loop(kind, n, send, out)
    pub = service = None  # ports before the node
    del node


def _send_zenoh(kind: str, n: int, shm: bool, addr: Any, out: Any) -> None:
    import zenoh
    import zenoh.shm as zs

    session = zenoh.open(_zenoh_config(False, addr))
    provider = zs.ShmProvider.default_backend(NBYTES * 8)
    pub = session.declare_publisher(
        "bench/frames",
        congestion_control=zenoh.CongestionControl.BLOCK
        if kind == "arrays"
        else zenoh.CongestionControl.DROP,
    )
    time.sleep(1.0)  # discovery of the subscriber (explicit endpoints, no scouting)

    def send(f: Any) -> None:
        buf = provider.alloc(NBYTES, policy=zs.BlockOn(zs.GarbageCollect()))
        buf[:] = _BACKING[id(f)]
        pub.put(buf)

    _send_loop(kind, n, send, out)
    pub.undeclare()
    session.close()


LIBS: Dict[str, Any] = {
    "se": (_recv_se, _send_se, True),
    "se_lease": (_recv_se, _send_se, "lease"),
    "se_socket": (_recv_se, _send_se, False),
    "raw": (_recv_raw, _send_raw, False),
    "iceoryx2": (_recv_iox, _send_iox, True),
    "zenoh": (_recv_zenoh, _send_zenoh, True),
}


def _available(lib: str) -> bool:
    mod = {"iceoryx2": "iceoryx2", "zenoh": "zenoh"}.get(lib)
    if mod is None:
        return True
    try:
        __import__(mod)
    except ImportError as exc:
        print(f"skipping {lib}: {exc}", file=sys.stderr)
        return False
    return True


def trial(lib: str, kind: str, n: int) -> Dict[str, float]:
    ctx = mp.get_context("spawn")
    recv, send, shm = LIBS[lib]
    ready, rout, sout = ctx.Queue(), ctx.Queue(), ctx.Queue()
    r = ctx.Process(target=recv, args=(kind, n, shm, ready, rout), daemon=True)
    r.start()
    s = None
    try:
        addr = ready.get(timeout=60)
        s = ctx.Process(target=send, args=(kind, n, shm, addr, sout), daemon=True)
        s.start()
        sres = sout.get(timeout=DEADLINE + 30)
        rres = rout.get(timeout=DEADLINE + 30)
    finally:
        for p in (s, r):
            if p is not None:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join(5)
    if kind == "arrays":
        elapsed = rres["t_end"] - sres["t0"]
        return {"gb_per_s": n * NBYTES / elapsed / 1e9, "fps": n / elapsed}
    ages = sorted(rres["ages"])
    return {
        "p50_ms": ages[len(ages) // 2],
        "p99_ms": ages[min(len(ages) - 1, int(len(ages) * 0.99))],
        "frames": float(len(ages)),
    }


def memcpy_gb_per_s() -> float:
    """The machine's copy speed right now: one 1080p frame, memoryview to bytearray (the
    ceiling of any scheme that copies a frame; the median of 20)."""
    import numpy as np

    src = memoryview(np.ones(NBYTES, np.uint8))
    dst = memoryview(bytearray(NBYTES))
    dst[:] = src
    times = []
    for _ in range(20):
        t = time.perf_counter()
        dst[:] = src
        times.append(time.perf_counter() - t)
    return NBYTES / statistics.median(times) / 1e9


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=100, help="frames per arrays trial")
    ap.add_argument("--camera", type=int, default=90, help="frames per camera trial (30 fps)")
    ap.add_argument("--only", default=",".join(LIBS))
    ap.add_argument("--kinds", default="arrays,camera")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    libs = [lib for lib in args.only.split(",") if _available(lib)]
    results: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for kind in args.kinds.split(","):
        n = args.frames if kind == "arrays" else args.camera
        for rnd in range(args.rounds):
            copy = memcpy_gb_per_s()
            results.setdefault("memcpy", {}).setdefault("memcpy", []).append({"gb_per_s": copy})
            print(f"memcpy of one frame, in process: {copy:.2f} GB/s", flush=True)
            order = libs[rnd % len(libs) :] + libs[: rnd % len(libs)]
            for lib in order:
                try:
                    res = trial(lib, kind, n)
                except Exception as exc:  # noqa: BLE001 - a failed trial is reported
                    print(f"{kind} {lib} round {rnd}: FAILED {type(exc).__name__}: {exc}")
                    continue
                results.setdefault(kind, {}).setdefault(lib, []).append(res)
                print(f"{kind} {lib} round {rnd}: {res}", flush=True)
    print()
    for kind, per_lib in results.items():
        key = "p50_ms" if kind == "camera" else "gb_per_s"
        print(f"{kind} (median of rounds, {key}):")
        med = {lib: statistics.median(r[key] for r in rs) for lib, rs in per_lib.items()}
        for lib, v in med.items():
            line = f"  {lib:10s} {v:8.3f}"
            if "raw" in med and kind == "arrays":
                line += f"   x{v / med['raw']:.2f} raw TCP"
            print(line)
        if kind == "arrays" and "raw" in per_lib and "se" in per_lib:
            ratios = [a["gb_per_s"] / b["gb_per_s"] for a, b in zip(per_lib["se"], per_lib["raw"])]
            print(f"  se / raw per round: {[round(x, 2) for x in ratios]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "results": results,
                    "shape": SHAPE,
                    "rounds": args.rounds,
                    "nproc": os.cpu_count(),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
