"""A burst of a million small writes to a slow peer: does the writer hold at most ``max_buffer``?

A socketengine Host runs in its own process and is made slow from outside: it is stopped
(SIGSTOP) for ``--stop-ms`` and let run (SIGCONT) for ``--run-ms``, in turn, for the whole
burst.  A Client in a fresh process, with ``max_buffer`` set to ``--max-buffer-mb``,
writes ``--n`` ``[seq, 100-byte str]`` values as fast as ``write`` returns (a write that
does not fit waits for room: backpressure).  Reported:

* ``queued_peak_mb``: the most bytes the client's send queue held, sampled every 1 ms by
  a thread (the queue's own count, at wire size);
* ``rss_growth_mb``: the writer process's peak RSS (VmHWM) during the burst minus its RSS
  before it: what the queued values really cost, Python objects included;
* ``rss_growth_x``: that growth over ``max_buffer`` (``<= 1``: the burst held at most
  ``max_buffer``).  With resume (the default) the writer also keeps what it sent and the
  stopped peer has not acknowledged, up to another ``max_buffer`` (the replay window):
  the bound is then 2x; ``--no-resume`` runs the host with ``resume_window=0``;
* ``writes_per_s``, ``seconds``: the burst's pace against that slow peer.

    python -m bench.burst                       # 1,000,000 writes, max_buffer 4 MiB
    python -m bench.burst --runs 5 --max-buffer-mb 16 [--no-resume]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

_HOST = r"""
import sys
from socketengine import Host
resume = {} if sys.argv[1] == "on" else {"resume_window": 0}
with Host(port=0, timeout=60, **resume) as h:
    print(h.port, flush=True)
    sys.stdin.read()  # until the parent closes it
"""

_WRITER = r"""
import json, sys, threading, time
from socketengine import Client

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0

port, n, max_buffer = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = Client(port=port, timeout=120, max_buffer=max_buffer)
c.write("small", [-1, "x" * 100])
c.flush()
text = "x" * 100
peak = [0]
done = threading.Event()

def sample():
    while not done.wait(0.001):
        conn = c._conn  # the bench reads the queue's own count (private)
        queued = conn._queue.queued if conn is not None else 0
        if queued > peak[0]:
            peak[0] = queued

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
before = rss("VmRSS:")
print("go", flush=True)
t0 = time.monotonic()
write = c.write
for i in range(n):
    write("small", [i, text])
t1 = time.monotonic()
done.set()
sampler.join()
hwm = rss("VmHWM:")
c.flush(120)
c.close()
print(json.dumps({"seconds": t1 - t0, "before": before, "hwm": hwm, "peak": peak[0]}), flush=True)
"""


def one_run(
    n: int, max_buffer: int, stop_ms: float, run_ms: float, resume: bool = True
) -> Dict[str, float]:
    host = subprocess.Popen(
        [sys.executable, "-c", _HOST, "on" if resume else "off"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = None
    try:
        assert host.stdout is not None
        port = int(host.stdout.readline())
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(port), str(n), str(max_buffer)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        if writer.stdout.readline().strip() != "go":
            raise RuntimeError("the writer did not start")
        deadline = time.monotonic() + 600
        while writer.poll() is None and time.monotonic() < deadline:
            os.kill(host.pid, signal.SIGSTOP)
            time.sleep(stop_ms / 1000)
            os.kill(host.pid, signal.SIGCONT)
            time.sleep(run_ms / 1000)
        os.kill(host.pid, signal.SIGCONT)
        out, _ = writer.communicate(timeout=120)
        res = json.loads(out.strip().splitlines()[-1])
    finally:
        try:
            os.kill(host.pid, signal.SIGCONT)
        except OSError:
            pass
        if writer is not None and writer.poll() is None:
            writer.kill()
        if host.stdin is not None:
            host.stdin.close()
        try:
            host.wait(10)
        except subprocess.TimeoutExpired:
            host.kill()
    growth = res["hwm"] - res["before"]
    return {
        "seconds": res["seconds"],
        "writes_per_s": n / res["seconds"],
        "queued_peak_mb": res["peak"] / 2**20,
        "rss_growth_mb": growth / 2**20,
        "rss_growth_x": growth / max_buffer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--max-buffer-mb", type=float, default=4.0)
    parser.add_argument("--stop-ms", type=float, default=20.0)
    parser.add_argument("--run-ms", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="the host runs with resume_window=0: no replay window on the writer's side",
    )
    args = parser.parse_args()
    max_buffer = int(args.max_buffer_mb * 2**20)
    runs: List[Dict[str, float]] = [
        one_run(args.n, max_buffer, args.stop_ms, args.run_ms, not args.no_resume)
        for _ in range(args.runs)
    ]
    summary: Dict[str, Any] = {
        "n": args.n,
        "max_buffer_mb": args.max_buffer_mb,
        "resume": not args.no_resume,
        "peer": f"stopped {args.stop_ms} ms / running {args.run_ms} ms",
        "load": os.getloadavg(),
    }
    for key in runs[0]:
        values = [r[key] for r in runs]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
