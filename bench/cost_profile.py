"""Where a small message's time goes: CPU µs per message in each stage, for several versions.

The ``small_xproc`` workload (a Client writes N ``[seq, 100-byte str]`` values on one
channel; a Host in another process polls ``get`` every 100 µs until the last one is in),
with each thread's own CPU clock (``pthread_getcpuclockid``) read before and after:

* **writer**: the thread calling ``client.write`` (encoding, queueing, sends it makes
  itself), or ``client.write_many`` for a version given as ``NAME=SRC_DIR@many``;
* **I/O thread**: the client's I/O thread (framing bursts, ``sendmsg``);
* **receiver**: the host's I/O thread (``recv``, frame parsing, decoding, storing the
  latest value).

Each version is a ``src`` directory put first on ``PYTHONPATH`` of both processes (take
one with ``git archive <commit> src | tar -x -C DIR``); the rounds alternate between
the versions and each stage's figure is the median over the rounds.  Writes a JSON file
and a small PNG bar chart::

    git archive f485cb5 src | tar -x -C /tmp/before
    git archive HEAD src | tar -x -C /tmp/after
    python -m bench.cost_profile before=/tmp/before/src after=/tmp/after/src \\
        --out docs/img/cost-profile.png
    python -m bench.cost_profile --replot docs/img/cost-profile.json --out docs/img/cost-profile.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

STAGES = ("writer", "io_thread", "receiver")
LABELS = {"writer": "writer", "io_thread": "I/O thread (sender)", "receiver": "receiver"}

_COMMON = r"""
import json, sys, threading, time

def cpu_ns(name):
    for t in threading.enumerate():
        if t.name == name:
            return time.clock_gettime_ns(time.pthread_getcpuclockid(t.ident))
    raise SystemExit("no thread named " + name)
"""

_HOST = (
    _COMMON
    + r"""
from socketengine import Host
h = Host(port=0, timeout=30)
print(h.port, flush=True)
n = int(sys.stdin.readline())
while True:  # the warm-up value
    v = h.get("small")
    if v is not None and v[0] == -1:
        break
    time.sleep(0.001)
before = cpu_ns("socketengine-host")
print("ready", flush=True)
last = n - 1
deadline = time.monotonic() + 120
while True:
    v = h.get("small")
    if v is not None and v[0] == last:
        break
    if time.monotonic() > deadline:
        raise SystemExit("timed out")
    time.sleep(1e-4)
after = cpu_ns("socketengine-host")
print(json.dumps({"receiver": after - before}), flush=True)
sys.stdin.readline()
h.close()
"""
)

_CLIENT = (
    _COMMON
    + r"""
from socketengine import Client
port, n = int(sys.argv[1]), int(sys.argv[2])
c = Client(port=port, timeout=30)
text = "x" * 100
c.write("small", [-1, text])
c.flush()
sys.stdin.readline()  # go
io0 = cpu_ns("socketengine-client")
w0 = time.thread_time_ns()
if sys.argv[3] == "many":  # write_many, 1,000 messages a call
    write_many = c.write_many
    for start in range(0, n, 1000):
        write_many([("small", [i, text]) for i in range(start, min(n, start + 1000))])
else:
    write = c.write
    for i in range(n):
        write("small", [i, text])
w1 = time.thread_time_ns()
c.flush(60)
sys.stdin.readline()  # the host has the last value
io1 = cpu_ns("socketengine-client")
print(json.dumps({"writer": w1 - w0, "io_thread": io1 - io0}), flush=True)
c.close()
"""
)


def one_round(src: str, n: int) -> Dict[str, float]:
    """One run of ``src`` (a source directory; ``DIR@many``: the writer uses
    ``write_many``, 1,000 messages a call)."""
    src, _, style = src.partition("@")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": env}
    host = subprocess.Popen([sys.executable, "-c", _HOST], **pipes)  # type: ignore[call-overload]
    client = None
    try:
        port = host.stdout.readline().strip()
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, port, str(n), style or "write"],
            **pipes,  # type: ignore[call-overload]
        )
        host.stdin.write(f"{n}\n")
        host.stdin.flush()
        if host.stdout.readline().strip() != "ready":
            raise RuntimeError("the host did not start")
        client.stdin.write("go\n")
        client.stdin.flush()
        got = json.loads(host.stdout.readline())
        client.stdin.write("done\n")
        client.stdin.flush()
        got.update(json.loads(client.stdout.readline()))
        host.stdin.write("bye\n")
        host.stdin.flush()
    finally:
        for proc in (client, host):
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {k: got[k] / n / 1000.0 for k in STAGES}  # µs per message


def measure(versions: List[Tuple[str, str]], n: int, rounds: int) -> Dict[str, Any]:
    samples: Dict[str, List[Dict[str, float]]] = {name: [] for name, _ in versions}
    for r in range(rounds):
        order = versions if r % 2 == 0 else versions[::-1]
        for name, src in order:
            res = one_round(src, n)
            samples[name].append(res)
            print(
                f"round {r + 1}/{rounds} {name}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in res.items()),
                file=sys.stderr,
            )
    return {
        "n": n,
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg(),
        "versions": {
            name: {k: statistics.median(s[k] for s in samples[name]) for k in STAGES}
            for name in samples
        },
        "samples": samples,
    }


def plot(result: Dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["versions"])
    colors = {"writer": "#4c72b0", "io_thread": "#dd8452", "receiver": "#55a868"}
    fig, ax = plt.subplots(figsize=(6.0, 1.3 + 0.35 * len(names)), dpi=80)
    for i, name in enumerate(names):
        left = 0.0
        for stage in STAGES:
            v = result["versions"][name][stage]
            ax.barh(i, v, left=left, color=colors[stage], label=LABELS[stage] if i == 0 else None)
            if v > 0.15:
                ax.text(left + v / 2, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
            left += v
        ax.text(left + 0.05, i, f"{left:.2f} µs", va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel("CPU µs per message (small [seq, 100-byte str], 2 processes)")
    ax.set_title(
        f"Cost per stage, median of {result['rounds']} rounds, N={result['n']:,}"
        f" ({result['date']}, load {result['load'][0]:.1f})",
        fontsize=9,
    )
    ax.legend(loc="upper center", fontsize=8, frameon=False, ncol=3, bbox_to_anchor=(0.5, -0.32))
    ax.set_xlim(0, max(sum(v.values()) for v in result["versions"].values()) * 1.2)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "versions",
        nargs="*",
        help="NAME=SRC_DIR, in chart order (NAME=SRC_DIR@many: the writer uses write_many)",
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="cost-profile.png", help="the PNG; the JSON beside it")
    parser.add_argument("--replot", help="redraw the chart from this JSON file")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
    else:
        versions = [tuple(v.split("=", 1)) for v in args.versions]
        if not versions or any(len(v) != 2 for v in versions):
            parser.error("give at least one NAME=SRC_DIR")
        result = measure(versions, args.n, args.rounds)  # type: ignore[arg-type]
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(result, f, indent=1)
    plot(result, args.out)
    for name, stages in result["versions"].items():
        print(name, ", ".join(f"{k} {v:.2f} µs" for k, v in stages.items()))


if __name__ == "__main__":
    main()
