"""Profile socketengine's small-message workload (client -> host, one process).

    python -m bench.profile_small [N]                 # cProfile, every thread, top 25
    py-spy record -o small.svg -- python -m bench.profile_small --plain 200000
    py-spy record --gil -o host.svg -- python -m bench.profile_small --plain --xproc 200000

``--xproc`` runs the client in a spawned process, so the profile shows the host's
receive path alone.

cProfile sees one thread at a time, so this installs a profiler in every thread
(``threading.setprofile``) and merges them: the writer (main thread) and both I/O
threads (host and client) all show up.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from typing import Any, List

from .common import deadline_in, small_message
from .stream import SEReceiver, SESender
from .xproc import Remote


def workload(n: int, xproc: bool = False) -> float:
    """Host here; the client here too, or (``xproc``) in a spawned process, so that a
    profiler attached to this process sees the host's receive path alone."""
    r = SEReceiver("small", {})
    s: Any = Remote(SESender, ("small", {}, r.port)) if xproc else SESender("small", {}, r.port)
    try:
        if xproc:
            s.call("warmup")
            r.wait_ready(deadline_in(30))
            s.send("go", n)
            out = r.measure(n, deadline_in(60))
            res = s.result(60)
        else:
            s.warmup()
            r.wait_ready(deadline_in(30))
            res = s.go(n)
            out = r.measure(n, res["t0"] + 60)
        return n / (out["t_end"] - res["t0"])
    finally:
        if xproc:
            s.shutdown()
        else:
            s.close()
        r.close()


def main(argv: List[str]) -> int:
    plain = "--plain" in argv
    xproc = "--xproc" in argv
    args = [a for a in argv if not a.startswith("--")]
    n = int(args[0]) if args else 100_000
    small_message(0)
    if plain:
        rate = workload(n, xproc)
        print(f"{n} messages: {rate:,.0f} msgs/s")
        return 0
    profiles: List[cProfile.Profile] = []
    lock = threading.Lock()

    def per_thread(*_: Any) -> None:
        # First event in a new thread: swap in a real profiler for this thread.
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        sys.setprofile(None)
        prof.enable()

    threading.setprofile(per_thread)
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        rate = workload(n, xproc)
    finally:
        main_prof.disable()
        threading.setprofile(None)
    for p in profiles:
        try:
            p.disable()
        except Exception:
            pass
    print(f"{n} messages: {rate:,.0f} msgs/s (under cProfile; all threads merged)")
    stats = pstats.Stats(main_prof)
    for p in profiles:
        try:
            stats.add(p)
        except TypeError:
            pass
    stats.sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
