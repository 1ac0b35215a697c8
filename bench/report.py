"""Results: aggregation (median/min/max, pairwise ratios), JSON, table, chart."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Any, Dict, List, Optional, Tuple

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
    for mod in ("msgpack", "numpy", "matplotlib", "simplejpeg", "imagezmq"):
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


def _se_compiled() -> Optional[List[str]]:
    """The socketengine modules this run used compiled (the optional mypyc build)."""
    try:
        from socketengine import compiled
    except ImportError:  # pragma: no cover - bench/ with an older socketengine
        return None
    return list(compiled.modules())


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
        "socketengine_compiled": _se_compiled(),
        "git": git_state(),
    }


def _panel(m: Any) -> str:
    return m.panel or ("throughput" if m.higher_is_better else "latency")


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
                    "panel": _panel(m),
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
    return f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}]"


def _groups(results: Dict[str, Any], libs: List[str]) -> List[Tuple[List[str], List[str]]]:
    """Workloads grouped by the libraries they were measured with, in order:
    ``[(libs, [workload, ...]), ...]``."""
    groups: List[Tuple[List[str], List[str]]] = []
    for name, wl in results.items():
        have = [lib for lib in libs if lib in wl["libs"]] or [SE]
        for g_libs, names in groups:
            if g_libs == have:
                names.append(name)
                break
        else:
            groups.append((have, [name]))
    return groups


def _rows(results: Dict[str, Any], names: List[str], libs: List[str]) -> List[List[str]]:
    anchors = [lib for lib in libs if lib != SE]
    rows = []
    for name in names:
        wl = results[name]
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
    return rows


TABLE_NOTE = (
    "cells: median [min, max] over runs; ratios: socketengine/anchor per run, median; "
    "^ higher is better, v lower is better"
)


def table(results: Dict[str, Any], libs: List[str]) -> str:
    """Plain-text tables, one per set of libraries (socket anchors, imagezmq anchors)."""
    blocks = []
    for g_libs, names in _groups(results, libs):
        anchors = [lib for lib in g_libs if lib != SE]
        head = ["workload", "metric"] + g_libs + [f"{SE[:2]}/{a}" for a in anchors]
        rows = [head] + _rows(results, names, g_libs)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks + [TABLE_NOTE])


def markdown(results: Dict[str, Any], libs: List[str]) -> str:
    """The same tables in Markdown (for the README)."""
    blocks = []
    for g_libs, names in _groups(results, libs):
        anchors = [lib for lib in g_libs if lib != SE]
        head = ["workload", "metric"] + g_libs + [f"se / {a}" for a in anchors]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in _rows(results, names, g_libs):
            if r[1].endswith((" ^", " v")):
                r[1] = r[1][:-2] + (" ↑" if r[1].endswith("^") else " ↓")
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        blocks.append("\n".join(lines))
    note = TABLE_NOTE.replace("^ higher", "↑ higher").replace("v lower", "↓ lower")
    return "\n\n".join(blocks + [note])


# -- files ------------------------------------------------------------------------------------


def chart_title(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    return (
        f"socketengine {m['versions'].get('socketengine')} vs anchors - {m['cpu_model']}, "
        f"{m['nproc']} CPUs, Python {m['python']}, {doc['runs']} runs, {m['date'][:10]}"
    )


def replot(json_path: str, png_path: str, as_markdown: bool = False) -> int:
    """Print the table and redraw the charts of an existing results file."""
    with open(json_path) as f:
        doc = json.load(f)
    results = doc["workloads"]
    for name, wl in results.items():  # presentation flags from the current definitions
        if name in WORKLOADS:
            for m in WORKLOADS[name].metrics:
                if m.key in wl["metrics"]:
                    wl["metrics"][m.key]["chart"] = m.chart and m.ratio
                    wl["metrics"][m.key]["panel"] = _panel(m)
    libs = [SE] + list(doc.get("anchors", []))
    print(markdown(results, libs) if as_markdown else table(results, libs))
    why = chart(png_path, results, libs, chart_title(doc))
    print(f"chart: {png_path}" if why is None else f"chart: not drawn ({why})")
    if doc.get("series"):
        lat_path = os.path.join(os.path.dirname(png_path) or ".", "bench-latency.png")
        lat_why = latency_chart(lat_path, doc)
        print(f"latency: {lat_path}" if lat_why is None else f"latency: not drawn ({lat_why})")
    return 0 if why is None else 1


def write_json(path: str, doc: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


PANELS = {
    "throughput": "throughput: above 1 = socketengine faster",
    "latency": "latency: below 1 = socketengine faster",
    "cost": "cost of 1000 idle clients: below 1 = socketengine lighter",
}
COLORS = {
    "pyzmq": "#4C72B0",
    "raw-tcp": "#DD8452",
    "imagezmq": "#55A868",
    "imagezmq-pubsub": "#8172B3",
}
LIB_COLORS = {SE: "#C44E52", **COLORS}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(path: str, results: Dict[str, Any], libs: List[str], title: str) -> Optional[str]:
    """Bars of socketengine/anchor ratios (log scale), one group per workload metric, one
    panel per kind: throughputs (above 1 = socketengine faster), latencies (below 1 =
    socketengine faster) and per-connection costs.  Each group has a bar per anchor
    measured in that workload.  Returns None on success, else why nothing was drawn."""
    try:
        plt = _plt()
    except ImportError:
        return "matplotlib is not installed"
    anchors = [lib for lib in libs if lib != SE]
    panels: Dict[str, List[Any]] = {k: [] for k in PANELS}
    for name, wl in results.items():
        for key, meta in wl["metrics"].items():
            if not meta["chart"]:
                continue
            bars = [(a, wl["ratios"][a][key]) for a in anchors if wl["ratios"].get(a, {}).get(key)]
            if bars:
                panel = meta.get("panel") or (
                    "throughput" if meta["higher_is_better"] else "latency"
                )
                panels.setdefault(panel, []).append((f"{name}\n{key}", bars))
    used = [(p, groups) for p, groups in panels.items() if groups]
    if not used:
        return "no ratios to draw"
    slots = [sum(len(b) for _, b in groups) + len(groups) for _, groups in used]
    fig, axes = plt.subplots(
        len(used),
        1,
        figsize=(max(9.0, 0.42 * max(slots) + 2), 3.9 * len(used)),
        squeeze=False,
        gridspec_kw={"height_ratios": [max(4, s) ** 0.3 for s in slots]},
    )
    for ax, (panel, groups) in zip(axes[:, 0], used):
        x = 0.0
        ticks, labels = [], []
        seen = set()
        for label, bars in groups:
            start = x
            for a, r in bars:
                med = r["median"]
                lo, hi = max(0.0, med - r["min"]), max(0.0, r["max"] - med)
                ax.bar(
                    x,
                    med,
                    0.9,
                    yerr=[[lo], [hi]],
                    capsize=2,
                    color=COLORS.get(a, "#999999"),
                    label=None if a in seen else f"socketengine / {a}",
                    error_kw={"elinewidth": 0.7, "ecolor": "#333333"},
                )
                seen.add(a)
                ax.annotate(
                    f"{med:.2f}",
                    (x, med + hi),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
                x += 1.0
            ticks.append((start + x - 1.0) / 2)
            labels.append(label)
            x += 1.0  # gap between groups
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlim(-1.0, x - 1.0)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(PANELS.get(panel, panel), fontsize=9)
        ax.set_ylabel("socketengine / anchor\n(median of per-run ratios)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 1.6)  # room for the value labels
    handles: Dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.suptitle(title + "\nbars: median, whiskers: min-max over runs", fontsize=9)
    axes[0, 0].legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 1.07),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


LATENCY_LABELS = {
    SE: "socketengine (newest frame: host.get)",
    "imagezmq": "imagezmq REQ/REP (camera blocked)",
    "imagezmq-pubsub": "imagezmq PUB/SUB (backlog)",
}


def latency_chart(path: str, doc: Dict[str, Any], name: str = "slow_receiver") -> Optional[str]:
    """Age of every frame the slow receiver handled, against time, one line per run,
    one colour per library (log scale); the legend gives the camera's achieved rate."""
    series = doc.get("series", {}).get(name)
    if not series:
        return f"no {name} series"
    try:
        plt = _plt()
    except ImportError:
        return "matplotlib is not installed"
    wl = doc["workloads"].get(name, {})
    sizes = doc.get("sizes", {})
    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    for lib, runs in series.items():
        send = wl.get("libs", {}).get(lib, {}).get("send_fps")
        label = LATENCY_LABELS.get(lib, lib)
        if send:
            label += f", camera sent {send['median']:.1f} fps"
        first = True
        for pts in runs:
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=LIB_COLORS.get(lib, "#999999"),
                linewidth=1.0,
                alpha=0.75,
                marker=".",
                markersize=3,
                label=label if first else None,
            )
            first = False
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the camera started", fontsize=8)
    ax.set_ylabel("age of the frame the receiver handles (ms)", fontsize=8)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left")
    fps = sizes.get("slow_fps", "?")
    work = sizes.get("slow_work_ms", "?")
    ax.set_title(
        f"slow receiver: camera {fps} fps 1080p JPEG q90, receiver busy {work} ms per frame "
        f"(every run drawn) - {doc['machine']['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
