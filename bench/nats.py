"""NATS transport benchmarks (minutes; not part of pytest).

``python -m bench.nats --out docs/nats-bench.json --chart docs/img/nats-cpu.png``

* ``cpu``: host CPU time (the host process, every thread) per ``write_all`` of a small
  value with K = 10, 100, 1000 subscribed clients, over NATS (host on node A, clients
  spread over A, B, C in 4 worker processes) and over direct TCP (same worker
  processes).  Measured from the first write to the moment every client holds the last
  value (``cpu_per_write_us``; ``cpu_net_per_write_us`` less the host's idle CPU rate;
  ``cpu_in_call_us``: inside the ``write_all`` calls only); heartbeats off (``HEARTBEAT``);
  the NATS servers' own CPU is not the host's.  One NATS connection per worker process
  and node (the process's gateway, shared by its clients).
* ``fanout``: deliveries/s in the same runs (N values x K clients / elapsed, the time
  at which every client's inline callback saw the last value).
* ``small``: one client writes N ``[seq, 100-byte str]`` values, time until the host
  holds the last; ``roundtrip``: the client writes "ping", the host answers on "pong";
  p50.  Through ONE NATS server vs direct TCP vs pyzmq (PUSH/PULL, REQ/REP), same
  process, same run, rounds alternating.

Figures are medians of ``--rounds`` rounds (min-max beside them).  The machine is shared:
read them as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

from .common import SMALL_TEXT, cpu_model, raise_nofile

WORKERS = 4
CHANNEL = "v"
#: s: the host's CPU with K idle connections, subtracted for the "net" figure.
IDLE_WINDOW = 1.0
#: Heartbeats are off in the cpu runs (both transports), so that the host's CPU is what
#: the writes cost (``--heartbeat S`` turns them on; the workers read it from the
#: environment).
HEARTBEAT = (
    float(os.environ["SE_BENCH_HEARTBEAT"]) if os.environ.get("SE_BENCH_HEARTBEAT") else None
)


# -- worker processes (clients) ----------------------------------------------------------------


def _worker(kind: str, target: Any, count: int, index: int, pipe: Any) -> None:
    """``count`` clients of one host; answers SEQ with the time at which every client
    held SEQ (an inline callback per client notes it: no polling)."""
    raise_nofile()
    from socketengine import Client

    clients: List[Any] = []
    lock = threading.Lock()
    want: List[Any] = [None]
    got: set = set()
    done = threading.Event()
    when: List[float] = [0.0]

    def arrived(i: int, seq: Any) -> None:
        with lock:
            if seq == want[0] and i not in got:
                got.add(i)
                if len(got) == len(clients):
                    when[0] = time.monotonic()
                    done.set()

    try:
        for i in range(count):
            if kind == "tcp":
                c = Client(port=target, connect_timeout=60, timeout=30, heartbeat=HEARTBEAT)
            else:
                urls, host = target
                c = Client(
                    url=urls[(index + i) % len(urls)],
                    host=host,
                    connect_timeout=60,
                    heartbeat=HEARTBEAT,
                )
            c.on(CHANNEL, lambda v, i=i: arrived(i, v[0]), inline=True)
            clients.append(c)
        pipe.send("ready")
        while True:
            msg = pipe.recv()
            if msg == "stop":
                break
            with lock:
                want[0] = msg
                got.clear()
                done.clear()
            for i, c in enumerate(clients):  # values that came before the question
                v = c.get(CHANNEL)
                if v is not None:
                    arrived(i, v[0])
            ok = done.wait(120)
            pipe.send(("done", ok, when[0]))
    finally:
        for c in clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        pipe.send("closed")


def _fan(kind: str, k: int, n: int, urls: List[str]) -> Dict[str, float]:
    from socketengine import Host

    name = f"bench-{uuid.uuid4().hex[:8]}"
    host = (
        Host(port=0, timeout=30, heartbeat=HEARTBEAT)
        if kind == "tcp"
        else Host(url=urls[0], name=name, heartbeat=HEARTBEAT)
    )
    target: Any = host.port if kind == "tcp" else (urls, name)
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    try:
        per = [k // WORKERS + (1 if i < k % WORKERS else 0) for i in range(WORKERS)]
        for i, count in enumerate(per):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(kind, target, count, i, theirs), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(mine)
        for pipe in pipes:
            if not pipe.poll(600) or pipe.recv() != "ready":
                raise RuntimeError("a worker did not start")
        deadline = time.monotonic() + 120
        while len(host.clients()) < k and time.monotonic() < deadline:
            time.sleep(0.01)  # polling the client count, bounded by the deadline
        payload = SMALL_TEXT
        host.write_all(CHANNEL, [-1, payload])  # warm-up
        for pipe in pipes:
            pipe.send(-1)
        for pipe in pipes:
            pipe.recv()
        # What the host costs while nobody writes (heartbeats of K connections): a
        # measurement window, not synchronisation.
        idle0, w0 = time.process_time(), time.monotonic()
        time.sleep(IDLE_WINDOW)
        idle_rate = (time.process_time() - idle0) / (time.monotonic() - w0)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for i in range(n):
            host.write_all(CHANNEL, [i, payload])
        calls = time.process_time() - cpu0
        for pipe in pipes:
            pipe.send(n - 1)
        ends = []
        for pipe in pipes:
            _, ok, t = pipe.recv()
            if not ok:
                raise RuntimeError("a client never got the last value")
            ends.append(t)
        cpu = time.process_time() - cpu0
        window = time.monotonic() - t0
        elapsed = max(ends) - t0
        return {
            "cpu_per_write_us": cpu / n * 1e6,
            "cpu_net_per_write_us": max(0.0, cpu - idle_rate * window) / n * 1e6,
            "cpu_in_call_us": calls / n * 1e6,
            "idle_cpu_share": idle_rate,
            "deliveries_per_s": n * k / elapsed,
            "dropped": k - len(host.clients()),  # connections lost during the run
            "load": os.getloadavg()[0],
        }
    finally:
        for pipe in pipes:
            try:
                pipe.send("stop")
            except Exception:  # noqa: BLE001
                pass
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        host.close()


# -- one process: small messages and round trips -----------------------------------------------


def _pair(kind: str, url: Optional[str]) -> Any:
    from socketengine import Client, Host

    if kind == "tcp":
        h = Host(port=0, timeout=30)
        return h, Client(port=h.port, connect_timeout=10, timeout=30)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    h = Host(url=url, name=name)
    return h, Client(url=url, host=name, connect_timeout=10)


def _small_se(kind: str, url: Optional[str], n: int) -> float:
    h, c = _pair(kind, url)
    try:
        c.write("s", [-1, SMALL_TEXT])
        deadline = time.monotonic() + 60
        while h.get("s") is None and time.monotonic() < deadline:
            time.sleep(1e-4)
        t0 = time.monotonic()
        for i in range(n):
            c.write("s", [i, SMALL_TEXT])
        while (h.get("s") or [None])[0] != n - 1 and time.monotonic() < deadline + 120:
            time.sleep(1e-4)  # polling the latest value, bounded
        return n / (time.monotonic() - t0)
    finally:
        c.close()
        h.close()


def _roundtrip_se(kind: str, url: Optional[str], n: int) -> float:
    h, c = _pair(kind, url)
    try:
        h.on("ping", lambda v, conn: h.write_all("pong", v), inline=True)
        sub = c.subscribe("pong")
        times = []
        for i in range(n + 20):
            t0 = time.perf_counter()
            c.write("ping", i)
            while sub.get(timeout=10) != i:
                pass
            if i >= 20:
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    finally:
        c.close()
        h.close()


def _small_zmq(n: int) -> float:
    import msgpack
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send(msgpack.packb([-1, SMALL_TEXT]))
        pull.recv()
        t0 = time.monotonic()
        for i in range(n):
            push.send(msgpack.packb([i, SMALL_TEXT]))
        for _ in range(n):
            msgpack.unpackb(pull.recv())
        return n / (time.monotonic() - t0)
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def _roundtrip_zmq(n: int) -> float:
    import threading

    import msgpack
    import zmq

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    port = rep.bind_to_random_port("tcp://127.0.0.1")

    def echo() -> None:
        for _ in range(n + 20):
            rep.send(rep.recv())

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    req = ctx.socket(zmq.REQ)
    req.connect(f"tcp://127.0.0.1:{port}")
    times = []
    try:
        for i in range(n + 20):
            t0 = time.perf_counter()
            req.send(msgpack.packb(i))
            msgpack.unpackb(req.recv())
            if i >= 20:
                times.append(time.perf_counter() - t0)
        t.join(10)
        return statistics.median(times) * 1e6
    finally:
        req.close(0)
        rep.close(0)
        ctx.term()


# -- driver ---------------------------------------------------------------------------------------


def _med(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nats", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="cpu,small,roundtrip")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ks", default="10,100,1000")
    ap.add_argument("--writes", type=int, default=200, help="write_all calls per cpu run")
    ap.add_argument("--small", type=int, default=20000, help="values per small run")
    ap.add_argument("--trips", type=int, default=500, help="round trips per run")
    ap.add_argument("--kinds", default="tcp,nats", help="transports of the cpu runs")
    ap.add_argument("--heartbeat", type=float, help="heartbeat of the cpu runs, s (default off)")
    ap.add_argument("--out", help="JSON results file (cpu figures merged into an existing one)")
    ap.add_argument("--chart", help="PNG chart of the cpu figures")
    args = ap.parse_args(argv)
    if args.heartbeat is not None:
        global HEARTBEAT
        HEARTBEAT = args.heartbeat
        os.environ["SE_BENCH_HEARTBEAT"] = str(args.heartbeat)  # for the workers
    raise_nofile()
    from socketengine.transport.nats.cluster import LocalCluster

    only = set(args.only.split(","))
    results: Dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rounds": args.rounds,
        "load_start": os.getloadavg(),
        "heartbeat": HEARTBEAT,
    }
    with LocalCluster(3) as cluster:
        urls = cluster.urls
        if "cpu" in only:
            cpu: Dict[str, Any] = {}
            for k in [int(x) for x in args.ks.split(",")]:
                kinds = args.kinds.split(",")
                runs: Dict[str, List[Dict[str, float]]] = {kind: [] for kind in kinds}
                for r in range(args.rounds):
                    for kind in kinds if r % 2 == 0 else kinds[::-1]:
                        out = _fan(kind, k, args.writes, urls)
                        print(f"cpu k={k} {kind}: {out}", flush=True)
                        runs[kind].append(out)
                cpu[str(k)] = {
                    kind: {key: _med([x[key] for x in runs[kind]]) for key in runs[kind][0]}
                    for kind in runs
                }
            results["cpu"] = cpu
        one = urls[0]
        if "small" in only:
            runs2: Dict[str, List[float]] = {"tcp": [], "nats": [], "pyzmq": []}
            for r in range(args.rounds):
                order = ["tcp", "nats", "pyzmq"]
                for kind in order[r % 3 :] + order[: r % 3]:
                    v = (
                        _small_zmq(args.small)
                        if kind == "pyzmq"
                        else _small_se(kind, one, args.small)
                    )
                    print(f"small {kind}: {v:.0f}/s", flush=True)
                    runs2[kind].append(v)
            results["small_msgs_per_s"] = {k: _med(v) for k, v in runs2.items()}
        if "roundtrip" in only:
            runs3: Dict[str, List[float]] = {"tcp": [], "nats": [], "pyzmq": []}
            for r in range(args.rounds):
                order = ["tcp", "nats", "pyzmq"]
                for kind in order[r % 3 :] + order[: r % 3]:
                    if kind == "pyzmq":
                        v = _roundtrip_zmq(args.trips)
                    else:
                        v = _roundtrip_se(kind, one, args.trips)
                    print(f"roundtrip {kind}: p50 {v:.0f} us", flush=True)
                    runs3[kind].append(v)
            results["roundtrip_p50_us"] = {k: _med(v) for k, v in runs3.items()}
    results["load_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if args.out and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = json.load(f)
        for k, v in old.get("cpu", {}).items():
            results.setdefault("cpu", {}).setdefault(k, {})
            for kind, figures in v.items():
                results["cpu"][k].setdefault(kind, figures)
        for key in ("small_msgs_per_s", "roundtrip_p50_us"):
            if key in old and key not in results:
                results[key] = old[key]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    if args.chart and "cpu" in results:
        _chart(results, args.chart)
    return 0


def _chart(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in results["cpu"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label, color in (("tcp", "direct TCP", "C0"), ("nats", "NATS (3 nodes)", "C1")):
        have = [k for k in ks if kind in results["cpu"][str(k)]]
        inside = [
            results["cpu"][str(k)][kind].get("cpu_in_call_us", {}).get("median") for k in have
        ]
        if all(v is not None for v in inside):
            ax.plot(have, inside, "--.", color=color, label=f"{label}: inside the write_all call")
        ys = [results["cpu"][str(k)][kind]["cpu_per_write_us"]["median"] for k in have]
        lo = [results["cpu"][str(k)][kind]["cpu_per_write_us"]["min"] for k in have]
        hi = [results["cpu"][str(k)][kind]["cpu_per_write_us"]["max"] for k in have]
        ax.errorbar(
            have,
            ys,
            yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
            marker="o",
            capsize=3,
            color=color,
            label=f"{label}: until every client has it",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("subscribed clients")
    ax.set_ylabel("host process CPU per write_all (us, median)")
    ax.set_title("Host CPU per write_all: the NATS servers fan out")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
