"""Results: aggregation (median/min/max, pairwise ratios), JSON, table, chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional

from .common import SE, cpu_model, pair_ratios, summary
from .workloads import WORKLOADS


def versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    try:
        import socketengine

        out["socketengine"] = getattr(socketengine, "__version__", None)
    except ImportError:  # pragma: no cover
        out["socketengine"] = None
    try:
        import zmq

        out["pyzmq"] = zmq.__version__
        out["libzmq"] = zmq.zmq_version()
    except ImportError:  # pragma: no cover
        out["pyzmq"] = None
    for mod in ("msgpack", "numpy", "matplotlib"):
        try:
            m = __import__(mod)
            v = getattr(m, "__version__", None)
            if v is None and hasattr(m, "version"):
                v = ".".join(str(x) for x in m.version)
            out[mod] = v
        except ImportError:
            out[mod] = None
    return out


def git_state() -> Dict[str, Any]:
    """HEAD of the working directory's repository and whether its src/ had uncommitted
    changes (read-only git).  Compare with ``socketengine_imported_from``: a run may
    import a snapshot (PYTHONPATH) rather than the working tree."""
    import subprocess

    def run(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(
                ["git", *args], capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = run("rev-parse", "HEAD")
    dirty = run("status", "--porcelain", "--", "src")
    return {"commit": commit, "src_dirty": None if dirty is None else bool(dirty)}


def _se_path() -> Optional[str]:
    try:
        import socketengine

        return os.path.dirname(os.path.abspath(socketengine.__file__ or ""))
    except ImportError:  # pragma: no cover
        return None


def machine() -> Dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = None
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "cpus_usable": affinity,
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "socketengine_imported_from": _se_path(),
        "git": git_state(),
    }


def aggregate(raw: Dict[str, Dict[str, Dict[str, List[Optional[float]]]]]) -> Dict[str, Any]:
    """``raw[workload][lib][metric]`` = per-run values -> summaries and ratios."""
    out: Dict[str, Any] = {}
    for name, by_lib in raw.items():
        wl = WORKLOADS[name]
        libs: Dict[str, Any] = {}
        for lib, metrics in by_lib.items():
            libs[lib] = {m: summary(v) for m, v in metrics.items()}
        ratios: Dict[str, Any] = {}
        mine = by_lib.get(SE, {})
        for anchor, metrics in by_lib.items():
            if anchor == SE:
                continue
            ratios[anchor] = {}
            for m in wl.metrics:
                if m.ratio and m.key in mine and m.key in metrics:
                    ratios[anchor][m.key] = summary(pair_ratios(mine[m.key], metrics[m.key]))
        out[name] = {
            "title": wl.title,
            "layout": wl.layout,
            "metrics": {
                m.key: {
                    "unit": m.unit,
                    "higher_is_better": m.higher_is_better if m.ratio else None,
                    "chart": m.chart and m.ratio,
                }
                for m in wl.metrics
            },
            "libs": libs,
            "ratios": ratios,
            "ratio_definition": "socketengine / anchor, computed per run index, then median",
        }
    return out


# -- table ------------------------------------------------------------------------------------


def fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e4:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(s: Optional[Dict[str, Any]]) -> str:
    if not s:
        return "failed"
    if s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def table(results: Dict[str, Any], libs: List[str]) -> str:
    anchors = [lib for lib in libs if lib != SE]
    head = ["workload", "metric"] + libs + [f"{SE[:2]}/{a}" for a in anchors]
    rows = [head]
    for name, wl in results.items():
        for key, meta in wl["metrics"].items():
            hib = meta["higher_is_better"]
            arrow = "" if hib is None else (" ^" if hib else " v")
            row = [name, f"{key} ({meta['unit']}){arrow}"]
            for lib in libs:
                row.append(cell(wl["libs"].get(lib, {}).get(key)))
            for a in anchors:
                r = wl["ratios"].get(a, {}).get(key)
                row.append(f"{r['median']:.2f}" if r else "-")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        "cells: median [min-max] over runs; ratios: socketengine/anchor per run, median; "
        "^ higher is better, v lower is better"
    )
    return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------


def chart_title(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    return (
        f"socketengine {m['versions'].get('socketengine')} vs anchors - {m['cpu_model']}, "
        f"{m['nproc']} CPUs, Python {m['python']}, {doc['runs']} runs, {m['date'][:10]}"
    )


def replot(json_path: str, png_path: str) -> int:
    """Print the table and redraw the chart of an existing results file."""
    with open(json_path) as f:
        doc = json.load(f)
    results = doc["workloads"]
    for name, wl in results.items():  # presentation flags from the current definitions
        if name in WORKLOADS:
            for m in WORKLOADS[name].metrics:
                if m.key in wl["metrics"]:
                    wl["metrics"][m.key]["chart"] = m.chart and m.ratio
    libs = [SE] + list(doc.get("anchors", []))
    print(table(results, libs))
    why = chart(png_path, results, libs, chart_title(doc))
    print(f"chart: {png_path}" if why is None else f"chart: not drawn ({why})")
    return 0 if why is None else 1


def write_json(path: str, doc: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def chart(path: str, results: Dict[str, Any], libs: List[str], title: str) -> Optional[str]:
    """Bars of socketengine/anchor ratios, one group per workload metric, in two panels:
    throughputs (higher is better) and latencies/costs (lower is better), so that a bar
    above 1 means "socketengine faster" on the left and "socketengine slower or heavier"
    on the right.  Returns None on success, else why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    anchors = [lib for lib in libs if lib != SE]
    panels: Dict[bool, List[Any]] = {True: [], False: []}
    for name, wl in results.items():
        for key, meta in wl["metrics"].items():
            if not meta["chart"]:
                continue
            vals = [wl["ratios"].get(a, {}).get(key) for a in anchors]
            if any(v for v in vals):
                panels[bool(meta["higher_is_better"])].append((f"{name}\n{key}", vals))
    if not panels[True] and not panels[False]:
        return "no ratios to draw"
    used = [(hib, groups) for hib, groups in panels.items() if groups]
    most = max(len(groups) for _, groups in used)
    fig, axes = plt.subplots(
        len(used), 1, figsize=(max(8.0, 1.1 * most + 2), 4.6 * len(used)), squeeze=False
    )
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    width = 0.8 / max(1, len(anchors))
    for ax, (hib, groups) in zip(axes[:, 0], used):
        for j, a in enumerate(anchors):
            xs, hs, lo, hi = [], [], [], []
            for i, (_, vals) in enumerate(groups):
                r = vals[j]
                if not r:
                    continue
                xs.append(i + (j - (len(anchors) - 1) / 2) * width)
                hs.append(r["median"])
                lo.append(max(0.0, r["median"] - r["min"]))
                hi.append(max(0.0, r["max"] - r["median"]))
            ax.bar(
                xs,
                hs,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=f"socketengine / {a}",
                color=colors[j % len(colors)],
                error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
            )
            for x, h, up in zip(xs, hs, hi):
                ax.annotate(
                    f"{h:.2f}",
                    (x, h + up),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g[0] for g in groups], fontsize=7)
        if hib:
            ax.set_title("throughput: above 1 = socketengine faster", fontsize=9)
        else:
            ax.set_title("latency and cost: above 1 = socketengine slower / heavier", fontsize=9)
        ax.set_ylabel("socketengine / anchor (median of per-run ratios, min-max bars)", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
