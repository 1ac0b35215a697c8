"""Cost of channel-pattern matching per message (socketengine.patterns).

    python -m bench.patterns               # 1, 10, 100, 500 patterns, median of 5 runs
    python -m bench.patterns --runs 3 --sizes 1,100

For each number of patterns N, a :class:`Matcher` holds N patterns of the shapes a robot
fleet uses (``robot7/+/temp``, ``robot7/#``, ``fleet/+/robot7/status``, ``cam7/+``) plus
one exact name per pattern, and is asked for a stream of channel names (about half of
them match something):

* ``cold``: every name is new to the matcher (cache miss: a walk of the trie);
* ``cached``: 64 names repeating, as on a real stream (one dict lookup);
* ``interest cold / cached``: :meth:`Interest.wants` with the same keys;
* ``add+remove``: one subscription change (add a key, later remove it) on the full
  matcher: the copy-on-write cost;
* ``linear scan``: the naive alternative, ``any(p.match(name) for p in patterns)`` with
  precompiled regexes, to show what the trie saves.

Figures are ns per name, median of ``--runs`` runs (min-max in brackets), one process,
one thread, measured in the thread's CPU time (``time.thread_time_ns``) so that other
processes on a shared machine do not inflate them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

from socketengine.patterns import Interest, Key, Matcher, Pattern

SHAPES = ("robot{i}/+/temp", "robot{i}/#", "fleet/+/robot{i}/status", "cam{i}/+")
LEAVES = ("temp", "status", "image", "pose")


def keys_for(n: int) -> List[Key]:
    keys: List[Key] = []
    for i in range(n):
        keys.append(Pattern(SHAPES[i % len(SHAPES)].format(i=i)))
        keys.append(f"exact{i}/value")
    return keys


def names_for(n: int, count: int, seed: int) -> List[str]:
    """``count`` channel names, about half matching one of the ``n`` patterns' shapes."""
    rng = random.Random(seed)
    out = []
    for k in range(count):
        i = rng.randrange(2 * n)  # i >= n: a robot no pattern names
        shape = rng.randrange(5)
        leaf = LEAVES[rng.randrange(len(LEAVES))]
        if shape == 0:
            out.append(f"robot{i}/arm{k % 7}/{leaf}")
        elif shape == 1:
            out.append(f"robot{i}/{leaf}")
        elif shape == 2:
            out.append(f"fleet/site{k % 3}/robot{i}/status")
        elif shape == 3:
            out.append(f"cam{i}/{leaf}")
        else:
            out.append(f"exact{i}/value")
    return out


def per_call_ns(fn: Callable[[str], object], names: Sequence[str], repeat: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(repeat):
        for name in names:
            fn(name)
    return (time.thread_time_ns() - t0) / (repeat * len(names))


def one_run(n: int, run: int) -> Dict[str, float]:
    keys = keys_for(n)
    patterns = [k for k in keys if isinstance(k, Pattern)]
    exact = {k for k in keys if isinstance(k, str)}
    for p in patterns:
        p.match("")  # compile the regexes outside the timing
    cold_names = names_for(n, 4000, seed=1000 + run)
    cold_names = list(dict.fromkeys(cold_names))  # unique: every call a cache miss
    hot_names = names_for(n, 64, seed=run)
    out: Dict[str, float] = {}

    m: Matcher[int] = Matcher((k, i) for i, k in enumerate(keys))
    out["cold"] = per_call_ns(m.match, cold_names, 1)
    for name in hot_names:
        m.match(name)
    out["cached"] = per_call_ns(m.match, hot_names, 300)

    interest = Interest(keys)
    out["interest cold"] = per_call_ns(interest.wants, cold_names, 1)
    out["interest cached"] = per_call_ns(interest.wants, hot_names, 300)

    def linear(name: str) -> bool:
        return name in exact or any(p.match(name) for p in patterns)

    out["linear scan"] = per_call_ns(linear, cold_names[:400], 1)

    extra = [Pattern(f"extra{i}/+/value") for i in range(50)] + [f"x{i}" for i in range(50)]
    t0 = time.thread_time_ns()
    for k in extra:
        m.add(k, -1)
    for k in extra:
        m.remove(k, -1)
    out["add+remove"] = (time.thread_time_ns() - t0) / len(extra)
    matched = sum(1 for name in hot_names if m.match(name))
    assert 0 < matched < len(hot_names), "the stream should mix matching and other names"
    return out


def main(argv: Sequence[str] = ()) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="1,10,100,500")
    args = ap.parse_args(list(argv) or None)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: Dict[int, Dict[str, List[float]]] = {}
    for run in range(args.runs):
        for n in sizes:
            for k, v in one_run(n, run).items():
                results.setdefault(n, {}).setdefault(k, []).append(v)
    columns = list(next(iter(results.values())).keys())
    print(f"ns per call, median of {args.runs} runs [min-max]; N patterns + N exact names\n")
    print("| N | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for n in sizes:
        cells: List[Tuple[float, float, float]] = []
        for c in columns:
            vs = results[n][c]
            cells.append((statistics.median(vs), min(vs), max(vs)))
        print(
            f"| {n} | "
            + " | ".join(f"{med:,.0f} [{lo:,.0f}-{hi:,.0f}]" for med, lo, hi in cells)
            + " |"
        )


if __name__ == "__main__":
    main()
