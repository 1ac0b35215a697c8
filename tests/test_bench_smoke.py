"""Smoke test of the benchmark suite: it runs, stops by itself and writes its results.

No timing assertions: the numbers only have to exist and be positive.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

from socketengine import compiled

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = [
    "small",
    "small_many",
    "small_aio_xproc",
    "small_aio_host",
    "small_aio_host_xproc",
    "fanout_aio",
    "images",
    "roundtrip",
    "roundtrip_aio_req_xproc",
]
#: socketengine write_image(codec="jpeg") against imagezmq's send_jpg (simplejpeg).
JPEG_WORKLOADS = ["jpeg"]

pytest.importorskip("numpy")


def _run_quick(tmp_path: Path, workloads: List[str], timeout: float) -> dict:
    if not (ROOT / "bench" / "__main__.py").exists():
        pytest.skip("bench/ is not in this checkout")
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--runs",
        "1",
        "--only",
        ",".join(workloads),
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    results = tmp_path / "bench-results.json"
    assert results.exists()
    doc = json.loads(results.read_text())
    assert doc["machine"]["nproc"] >= 1
    for name in workloads:
        workload = doc["workloads"][name]
        for lib, metrics in workload["libs"].items():
            for key, summary in metrics.items():
                assert summary is not None, f"{name}/{lib}/{key}: no value"
                assert summary["median"] > 0, f"{name}/{lib}/{key}: {summary}"
        assert "socketengine" in workload["libs"]
    return doc


def _run_tool(
    module: str, args: List[str], out: Path, written: Optional[Path] = None
) -> Tuple[Any, Any]:
    """Run ``python -m module *args out`` (a bench tool whose last option names its
    output) from the repository root; return the finished process and the JSON it wrote
    (``out``, or ``written`` when the tool puts it elsewhere)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads((written or out).read_text())


@pytest.mark.timeout(150)
def test_bench_quick_smoke(tmp_path: Path) -> None:
    _run_quick(tmp_path, WORKLOADS, 120)


@pytest.mark.timeout(90)
def test_bench_quick_jpeg(tmp_path: Path) -> None:
    pytest.importorskip("simplejpeg")
    pytest.importorskip("zmq")
    pytest.importorskip("imagezmq")
    doc = _run_quick(tmp_path, JPEG_WORKLOADS, 60)
    libs = doc["workloads"]["jpeg"]["libs"]
    assert set(libs) == {"socketengine", "imagezmq", "imagezmq-pubsub"}
    assert doc["workloads"]["jpeg"]["ratios"]["imagezmq"]["fps"]["median"] > 0


@pytest.mark.timeout(120)
def test_pacing_smoke(tmp_path: Path) -> None:
    if not (ROOT / "bench" / "pacing.py").exists():
        pytest.skip("bench/ is not in this checkout")
    py = sys.executable
    proc, doc = _run_tool(
        "bench.pacing",
        [f"default={py}", f"cap1={py}@1", "--n", "20000", "--rounds", "2", "--json"],
        tmp_path / "pacing.json",
    )
    assert set(doc["summary"]) == {"default", "cap1"}
    for name, row in doc["summary"].items():
        assert len(doc["runs"][name]) == 2, name
        assert row["msgs_per_s"] > 0 and row["rss_mb"] > 0, name
        assert row["faults_per_msg"] >= 0 and row["writes_paced"] >= 0, name
    assert "faults/msg" in proc.stdout


@pytest.mark.timeout(120)
def test_writer_floor_smoke(tmp_path: Path) -> None:
    pytest.importorskip("zmq")
    if not (ROOT / "bench" / "writer_floor.py").exists():
        pytest.skip("bench/ is not in this checkout")
    proc, doc = _run_tool(
        "bench.writer_floor", ["--n", "2000", "--rounds", "2", "--json"], tmp_path / "floor.json"
    )
    rows = doc["us_per_message"]
    names = {
        "pack alone",
        "minimal write",
        "socketengine encode",
        "socketengine",
        "socketengine write_many",
        "pyzmq",
    }
    assert set(rows) == names
    for name, row in rows.items():
        assert len(row["runs"]) == 2 and row["median"] > 0, name
    assert set(doc["pyzmq_over"]) == set(rows) - {"pyzmq"}
    assert "pyzmq ÷ this" in proc.stdout


@pytest.mark.timeout(120)
def test_rt_timeline_smoke(tmp_path: Path) -> None:
    if not (ROOT / "bench" / "rt_timeline.py").exists():
        pytest.skip("bench/ is not in this checkout")
    if not hasattr(select, "epoll"):
        pytest.skip("the I/O loop's epoll wait is what the host side is timed by")
    if compiled.modules():
        proc = subprocess.run(
            [sys.executable, "-m", "bench.rt_timeline", "--n", "10", "--rounds", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "interpreted install" in proc.stderr
        pytest.skip("the compiled build: rt_timeline refuses (checked), it wraps methods")
    proc, doc = _run_tool(
        "bench.rt_timeline", ["--n", "300", "--rounds", "2", "--json"], tmp_path / "timeline.json"
    )
    segments = [
        "client send",
        "wire out",
        "host read",
        "host reply",
        "wire back",
        "client receive",
    ]
    for system in ("socketengine", "raw"):
        p50 = doc["us_p50"][system]
        assert list(p50) == [*segments, "total"], system
        # One side's steps follow each other; across the sides they may overlap (a
        # peer can wake before the send that woke it returns): "wire" may be < 0.
        one_side = ("client send", "host read", "host reply", "client receive")
        assert all(p50[s] > 0 for s in one_side), (system, p50)
        assert p50["total"] > 0
        assert all(len(doc["runs"][system][s]) == 2 for s in segments)
        # Requests followed through every step, per round (at least half, or it fails).
        assert len(doc["followed"][system]) == 2
        assert all(150 <= count <= 300 for count in doc["followed"][system])
    assert set(doc["over_raw"]) == {*segments, "total"}
    assert "client receive" in proc.stdout


@pytest.mark.timeout(120)
def test_cost_profile_smoke(tmp_path: Path) -> None:
    # The tool behind docs/benchmarks.md "Where the time goes": two versions (here both
    # this checkout's src, one with write_many), one round, a JSON beside the chart.
    pytest.importorskip("matplotlib")
    if not (ROOT / "bench" / "cost_profile.py").exists():
        pytest.skip("bench/ is not in this checkout")
    src = str(ROOT / "src")
    args = [f"write={src}", f"many={src}@many", "--n", "2000", "--rounds", "1", "--out"]
    _, doc = _run_tool("bench.cost_profile", args, tmp_path / "cost.png", tmp_path / "cost.json")
    assert (tmp_path / "cost.png").stat().st_size > 0
    assert doc["n"] == 2000 and doc["rounds"] == 1
    assert list(doc["versions"]) == ["write", "many"]
    for name, stages in doc["versions"].items():
        assert set(stages) == {"writer", "io_thread", "receiver"}, name
        assert all(stages[stage] > 0 for stage in ("writer", "receiver")), (name, stages)


def test_runs_are_sized_by_time_once_per_workload_and_library() -> None:
    if not (ROOT / "bench" / "workloads.py").exists():
        pytest.skip("bench/ is not in this checkout")
    from bench.workloads import MAX_GROWTH, sized_n

    calls: List[int] = []

    def run_at(rate: float) -> Any:
        def run(n: int) -> float:  # one run of n values at this rate: its duration
            calls.append(n)
            return n / rate

        return run

    cfg: dict = {"min_run_s": 0.5}
    # 100,000 values at 2M/s last 50 ms: N grows tenfold, from one sizing run.
    assert sized_n(cfg, "small", "fast", 100_000, run_at(2e6)) == 1_000_000
    assert calls == [100_000]
    # Chosen once: later runs of the same workload and library send the same N.
    assert sized_n(cfg, "small", "fast", 100_000, run_at(1.0)) == 1_000_000
    assert calls == [100_000]
    # Rounded up to two significant digits: 100,000 / 0.5 s * 0.5 s / 0.13 s.
    assert sized_n(cfg, "small", "mid", 100_000, run_at(100_000 / 0.13)) == 390_000
    # A run that is long enough keeps N; a very short one is capped.
    assert sized_n(cfg, "small", "slow", 100_000, run_at(1e5)) == 100_000
    assert sized_n(cfg, "small", "instant", 100_000, run_at(1e12)) == 100_000 * MAX_GROWTH
    # Another workload is sized on its own; 0 s (--quick) sends N without a sizing run.
    assert sized_n(cfg, "small_xproc", "fast", 100_000, run_at(4e6)) == 2_000_000
    before = len(calls)
    assert sized_n({"min_run_s": 0.0}, "small", "fast", 2000, run_at(2e6)) == 2000
    assert len(calls) == before


@pytest.mark.timeout(120)
def test_bench_min_run_grows_short_runs(tmp_path: Path) -> None:
    if not (ROOT / "bench" / "__main__.py").exists():
        pytest.skip("bench/ is not in this checkout")
    cmd = [sys.executable, "-m", "bench", "--quick", "--runs", "2", "--only", "small,fanout"]
    cmd += ["--libs", "socketengine", "--min-run", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    doc = json.loads((tmp_path / "bench-results.json").read_text())
    assert doc["min_run_s"] == 2.0
    # --quick sends 2,000 small values and 200 fan-out values (to 20 clients): far less
    # than 2 s at any rate this library reaches (growth is capped at 20 times N).  Both
    # measured runs sent the one N the sizing run chose.
    for name, quick_n in (("small", 2000), ("fanout", 200)):
        n = doc["workloads"][name]["libs"]["socketengine"]["n"]
        assert n["min"] == n["max"] > doc["sizes"][name] == quick_n, (name, n)
        assert f"sizing socketengine: N={quick_n} took" in proc.stdout + proc.stderr
