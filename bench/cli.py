"""``python -m bench``: run the workloads, print the table, write JSON and a chart."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Dict, List, Optional

from . import common, jpeg, report
from .common import SE, log, raise_nofile
from .workloads import LIBS, MIN_RUN_S, SIZES, WORKLOADS

#: Sizes that are not multiplied by ``--scale``.
FIXED_SIZES = ("fanout_clients", "many_workers", "slow_fps", "slow_work_ms")

#: Stop everything (children too) if the suite runs longer than this, seconds.
MAX_TIME = {"quick": 150.0, "full": 1800.0}
#: Deadline of each wait inside one trial, seconds.
TRIAL_TIMEOUT = {"quick": 20.0, "full": 60.0}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="socketengine benchmarks, side by side with pyzmq and raw TCP sockets.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs: a smoke test")
    p.add_argument("--runs", type=int, default=None, help="runs per figure (default 5; quick 2)")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated workloads: " + ",".join(WORKLOADS),
    )
    p.add_argument(
        "--libs", default=None, help="comma-separated libraries (default: " + ",".join(LIBS) + ")"
    )
    p.add_argument(
        "--out",
        default=None,
        help="output directory for bench-results.json and bench-chart.png "
        "(default docs/; with --quick a fresh temporary directory)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply every N by this factor")
    p.add_argument(
        "--min-run",
        type=float,
        default=None,
        metavar="SECONDS",
        help="small-message and fan-out workloads: a library whose run of N values is "
        "shorter than this gets a larger N, set by one unmeasured sizing run "
        "(default 0.5; quick 0 = off)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=common.POLL_SLEEP,
        help="roundtrip: seconds slept between two polls of the latest value "
        "(default %(default)s = sleep(0); negative: no sleep call at all)",
    )
    p.add_argument(
        "--wait-poll",
        type=float,
        default=common.WAIT_SLEEP,
        help="throughput runs: seconds slept between polls for the last value "
        "(default %(default)s)",
    )
    p.add_argument("--max-time", type=float, default=None, help="abort the suite after this")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the results table as Markdown (for the README) instead of plain text",
    )
    p.add_argument(
        "--replot",
        metavar="JSON",
        default=None,
        help="only print the table and redraw the chart of an existing bench-results.json "
        "(the chart goes next to it)",
    )
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be >= 1")
    names = list(WORKLOADS) if not args.only else [s.strip() for s in args.only.split(",") if s]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    args.names = names
    libs = LIBS if not args.libs else [s.strip() for s in args.libs.split(",") if s]
    bad = [x for x in libs if x not in LIBS]
    if bad:
        p.error(f"unknown librar(y/ies) {', '.join(bad)}; choose from {', '.join(LIBS)}")
    if not args.libs:
        try:
            import zmq  # noqa: F401
        except ImportError:
            log("bench: pyzmq is not installed; running without the pyzmq anchor")
            libs = [x for x in libs if x != "pyzmq"]
    izmq = [jpeg.IZMQ, jpeg.IZMQ_PS]
    if any(x in libs for x in izmq) and any(set(WORKLOADS[n].libs) & set(izmq) for n in names):
        why = jpeg.imagezmq_missing()
        if why:
            if args.libs:
                p.error(f"imagezmq anchors requested but {why}")
            log(f"bench: {why}; running the JPEG workloads without the imagezmq anchors")
            libs = [x for x in libs if x not in izmq]
    args.lib_list = [x for x in LIBS if x in libs]
    skipped = []
    for n in names:
        requires = WORKLOADS[n].requires
        why = requires() if requires else None
        if why:
            log(f"bench: skipping {n}: {why}")
            skipped.append(n)
    args.names = [n for n in names if n not in skipped]
    return args


def _last_line(exc: BaseException) -> str:
    """The most telling line of an error (a child's traceback ends with its error)."""
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def _watchdog(seconds: float) -> threading.Timer:
    def fire() -> None:
        log(f"bench: still running after {seconds:.0f} s; aborting")
        for child in multiprocessing.active_children():
            try:
                child.kill()
            except Exception:
                pass
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()
    return t


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return report.replot(
            args.replot,
            os.path.join(os.path.dirname(args.replot) or ".", "bench-chart.png"),
            as_markdown=args.markdown,
        )
    if args.list:
        for name, wl in WORKLOADS.items():
            print(f"{name:16} {wl.title} ({wl.layout})")
        return 0
    mode = "quick" if args.quick else "full"
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    sizes = {k: max(1, int(round(v * args.scale))) for k, v in SIZES[mode].items()}
    for key in ("images", "images_xproc", "jpeg", "jpeg_xproc"):
        sizes[key] = max(2, sizes[key])
    sizes["slow_receiver"] = max(1000, sizes["slow_receiver"])
    for key in FIXED_SIZES:
        sizes[key] = SIZES[mode][key]
    common.POLL_SLEEP = args.poll
    common.WAIT_SLEEP = args.wait_poll
    if args.out:
        out_dir = args.out
    elif args.quick:
        out_dir = tempfile.mkdtemp(prefix="socketengine-bench-")
    else:
        out_dir = "docs"
    os.makedirs(out_dir, exist_ok=True)
    raise_nofile(8192)
    watchdog = _watchdog(args.max_time or MAX_TIME[mode])
    min_run = args.min_run if args.min_run is not None else MIN_RUN_S[mode]
    cfg: Dict[str, Any] = {"sizes": sizes, "timeout": TRIAL_TIMEOUT[mode], "min_run_s": min_run}

    libs = args.lib_list
    raw: Dict[str, Dict[str, Dict[str, List[Optional[float]]]]] = {}
    #: Per-run time series some workloads return (``"series"``), for their own chart.
    series: Dict[str, Dict[str, List[Any]]] = {}
    errors: List[Dict[str, Any]] = []
    total = sum(len([x for x in libs if x in WORKLOADS[n].libs]) for n in args.names) * runs
    step = 0
    started = time.monotonic()
    try:
        load_at_start: Optional[List[float]] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load_at_start = None
    log(
        f"bench: {mode} mode, {runs} run(s), workloads {','.join(args.names)}, "
        f"libraries {','.join(libs)}; results -> {out_dir}"
    )
    for name in args.names:
        wl = WORKLOADS[name]
        wl_libs = [x for x in libs if x in wl.libs]
        if not wl_libs:
            log(f"== {name}: skipped (none of its libraries is selected)")
            continue
        raw[name] = {lib: {m.key: [None] * runs for m in wl.metrics} for lib in wl_libs}
        log(f"== {name}: {wl.title} [{wl.layout}; N={sizes[wl.size_key]}]")
        for run in range(runs):
            # Rotate the order so no library always runs first (or last) in a run.
            order = wl_libs[run % len(wl_libs) :] + wl_libs[: run % len(wl_libs)]
            for lib in order:
                step += 1
                t0 = time.monotonic()
                prefix = f"[{step:>3}/{total}] {name:<15} run {run + 1}/{runs} {lib:<12}"
                try:
                    metrics = wl.trial(lib, cfg)
                except Exception as exc:
                    errors.append(
                        {
                            "workload": name,
                            "lib": lib,
                            "run": run,
                            "error": f"{type(exc).__name__}: {_last_line(exc)}",
                            "traceback": traceback.format_exc(),
                        }
                    )
                    log(
                        f"{prefix} FAILED ({type(exc).__name__}: {_last_line(exc)})"
                        f"  ({time.monotonic() - t0:.1f} s)"
                    )
                    continue
                for k, v in metrics.items():
                    if k in raw[name][lib]:
                        raw[name][lib][k][run] = float(v)
                    elif k == "series":
                        series.setdefault(name, {}).setdefault(lib, [None] * runs)[run] = v
                shown = "  ".join(
                    f"{m.key}={report.fmt(metrics.get(m.key))}" for m in wl.metrics if m.chart
                )
                log(f"{prefix} {shown}  ({time.monotonic() - t0:.1f} s)")

    results = report.aggregate(raw)
    doc: Dict[str, Any] = {
        "suite": "socketengine benchmarks (python -m bench)",
        "mode": mode,
        "runs": runs,
        "sizes": sizes,
        "min_run_s": min_run,
        "poll_sleep_s": {"roundtrip": common.POLL_SLEEP, "throughput_wait": common.WAIT_SLEEP},
        "duration_s": round(time.monotonic() - started, 1),
        "machine": report.machine(),
        "anchors": [x for x in libs if x != SE],
        "workloads": results,
        "errors": errors,
        "series": series,
    }
    doc["machine"]["loadavg_at_start"] = load_at_start
    try:
        doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    json_path = os.path.join(out_dir, "bench-results.json")
    report.write_json(json_path, doc)
    png_path = os.path.join(out_dir, "bench-chart.png")
    why = report.chart(png_path, results, libs, report.chart_title(doc))
    lat_path = os.path.join(out_dir, "bench-latency.png")
    lat_why = report.latency_chart(lat_path, doc) if series else "no time series"
    watchdog.cancel()

    print(report.markdown(results, libs) if args.markdown else report.table(results, libs))
    print()
    print(f"results: {json_path}")
    print(f"chart:   {png_path}" if why is None else f"chart:   not drawn ({why})")
    if series:
        print(f"latency: {lat_path}" if lat_why is None else f"latency: not drawn ({lat_why})")
    print(f"time:    {doc['duration_s']} s")
    if errors:
        print(f"{len(errors)} trial(s) failed:", file=sys.stderr)
        for e in errors:
            print(f"  {e['workload']} {e['lib']} run {e['run'] + 1}: {e['error']}", file=sys.stderr)
        return 1
    return 0
