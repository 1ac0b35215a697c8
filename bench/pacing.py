"""What a writer far ahead of its I/O thread costs, and what pacing changes.

A Host and a Client in one fresh process; the client writes ``--n`` ``[seq, 100-byte
str]`` values as fast as ``write`` returns, and the run ends when the host holds the
last one.  Each run is a new process, so its memory figures are its own:

* ``msgs_per_s``: N over the time from the first write to the host holding the last;
* ``faults_per_msg``: minor page faults of the process during the burst, per message
  (memory touched for the first time: a queue that keeps growing);
* ``rss_mb``: the process's peak RSS;
* ``writes_paced``: writes that waited for the flush (``stats()["writes_paced"]``;
  ``-`` for a version without pacing).

Variants run in rotating order, ``--rounds`` times; each figure is the median over the
rounds.  A variant is ``NAME=PYTHON`` (an interpreter, e.g. another venv's with an
older install, or the compiled build's) or ``NAME=PYTHON@MiB`` (that interpreter with
the client's ``max_buffer`` set to MiB)::

    python -m bench.pacing                                   # this Python, 5 rounds
    python -m bench.pacing --n 2000000 old=/tmp/old/bin/python new=.venv/bin/python
    python -m bench.pacing cap1=.venv/bin/python@1 cap4=.venv/bin/python@4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Tuple

_RUN = r"""
import json, resource, sys, time
from socketengine import Client, Host
n, cap = int(sys.argv[1]), int(sys.argv[2])
text = "x" * 100
opts = {"max_buffer": cap * 1024 * 1024} if cap else {}
with Host(port=0) as h, Client(port=h.port, **opts) as c:
    for i in range(2000):
        c.write("warm", [i, text])
    c.flush()
    deadline = time.monotonic() + 30
    while h.get("warm") != [1999, text]:
        if time.monotonic() > deadline:
            raise SystemExit("the warm-up values did not arrive")
        time.sleep(0.001)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    last = n - 1
    t0 = time.perf_counter()
    write = c.write
    for i in range(n):
        write("burst", [i, text])
    deadline = time.monotonic() + 120
    while True:
        v = h.get("burst")
        if v is not None and v[0] == last:
            break
        if time.monotonic() > deadline:
            raise SystemExit("the last value did not arrive")
        time.sleep(0.0001)
    t1 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    conn = c._conn
    paced = getattr(conn, "writes_paced", None)
print(json.dumps({
    "msgs_per_s": n / (t1 - t0),
    "faults_per_msg": (usage.ru_minflt - before) / n,
    "rss_mb": usage.ru_maxrss / 1024,
    "writes_paced": paced,
}))
"""

METRICS = ("msgs_per_s", "faults_per_msg", "rss_mb", "writes_paced")


def parse_variant(spec: str) -> Tuple[str, str, int]:
    """``NAME=PYTHON`` or ``NAME=PYTHON@MiB`` -> (name, python, max_buffer MiB or 0)."""
    if "=" not in spec:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NAME=PYTHON or NAME=PYTHON@MiB")
    name, python = spec.split("=", 1)
    cap = 0
    if "@" in python:
        python, mib = python.rsplit("@", 1)
        cap = int(mib)
    return name, python, cap


def run_once(python: str, n: int, cap: int) -> Dict[str, Any]:
    proc = subprocess.run(
        [python, "-c", _RUN, str(n), str(cap)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{python}: run failed:\n{proc.stderr[-2000:]}")
    result: Dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pacing", description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", type=parse_variant, help="NAME=PYTHON[@MiB]")
    ap.add_argument("--n", type=int, default=1_000_000, help="writes per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    variants = args.variants or [("this", sys.executable, 0)]
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name, python, cap in order:
            res = run_once(python, args.n, cap)
            runs[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name}: {json.dumps(res)}", flush=True)
    summary: Dict[str, Dict[str, Any]] = {}
    for name, results in runs.items():
        row: Dict[str, Any] = {}
        for m in METRICS:
            vals = [x[m] for x in results if x[m] is not None]
            row[m] = statistics.median(vals) if vals else None
            row[m + "_range"] = [min(vals), max(vals)] if vals else None
        summary[name] = row
    print(f"\n{'variant':<12} {'msgs/s':>10} {'faults/msg':>11} {'RSS MB':>8} {'paced':>7}")
    for name, row in summary.items():
        paced = "-" if row["writes_paced"] is None else f"{row['writes_paced']:.0f}"
        print(
            f"{name:<12} {row['msgs_per_s']:>10,.0f} {row['faults_per_msg']:>11.4f} "
            f"{row['rss_mb']:>8.0f} {paced:>7}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "rounds": args.rounds, "summary": summary, "runs": runs}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
