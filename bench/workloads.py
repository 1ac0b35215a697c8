"""The workloads: what each measures, its sizes, and one trial of it for one library."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional

from . import fanout, jpeg, many, roundtrip, stream
from .common import (
    RAW,
    SE,
    ZMQ,
    close_quietly,
    deadline_in,
    frame_nbytes,
    log,
    percentile,
)
from .xproc import Remote, shutdown_all

#: The anchors of the socket-level workloads.
BASE_LIBS = [SE, ZMQ, RAW]
#: Every library the suite knows: imagezmq (REQ/REP and PUB/SUB) anchors the JPEG ones.
LIBS = [SE, ZMQ, RAW, jpeg.IZMQ, jpeg.IZMQ_PS]


class Metric(NamedTuple):
    key: str
    unit: str
    higher_is_better: bool
    chart: bool = True
    ratio: bool = True  # False: a diagnostic, no socketengine/anchor ratio
    #: Chart panel: "throughput", "latency" or "cost"; "" = from higher_is_better.
    panel: str = ""


class Workload(NamedTuple):
    name: str
    title: str
    metrics: List[Metric]
    size_key: str  # which entry of the sizes dict is N
    trial: Callable[[str, Dict[str, Any]], Dict[str, float]]
    libs: List[str]
    layout: str  # "1 process" / "2 processes" / ...
    #: Returns why the workload cannot run on this machine (a missing package), or None.
    requires: Optional[Callable[[], Optional[str]]] = None


#: N per workload.  ``full`` keeps the whole suite (5 runs) around 9 minutes on a
#: 2-core machine; ``quick`` is a smoke test.  The small-message and fan-out workloads
#: send at least this N, and more where a run would be shorter than ``MIN_RUN_S``
#: (``sized_n``).
SIZES: Dict[str, Dict[str, int]] = {
    "full": {
        "small": 100000,
        "roundtrip": 5000,
        "images": 100,
        "arrays": 100,
        "fanout": 20000,
        "fanout_clients": 20,
        "many": 1000,
        "many_workers": 4,
        "small_xproc": 100000,
        "images_xproc": 100,
        "arrays_xproc": 100,
        "roundtrip_xproc": 5000,
        "jpeg": 200,
        "jpeg_xproc": 200,
        "slow_receiver": 8000,  # ms the camera sends for
        "slow_fps": 30,
        "slow_work_ms": 100,
    },
    "quick": {
        "small": 2000,
        "roundtrip": 200,
        "images": 6,
        "arrays": 6,
        "fanout": 200,
        "fanout_clients": 20,
        "many": 100,
        "many_workers": 4,
        "small_xproc": 2000,
        "images_xproc": 6,
        "arrays_xproc": 6,
        "roundtrip_xproc": 200,
        "jpeg": 12,
        "jpeg_xproc": 12,
        "slow_receiver": 2000,
        "slow_fps": 30,
        "slow_work_ms": 100,
    },
}


#: Small-message and fan-out runs are sized by time as well as by count.  A library
#: whose run of the workload's N (sender's first value to the receiver's last) lasts
#: less than this many seconds gets a larger N, chosen once per workload and library by
#: one unmeasured sizing run, so that its measured runs last about this long.  Over
#: N = 100,000 socketengine's run lasts 40-60 ms, a handful of switch intervals of the
#: interpreter lock, and its start-up (first batch, first wake of each I/O thread) weighs
#: on the rate; pyzmq's lasts 120-170 ms (docs/benchmarks.md, 2026-12-07).  0
#: (``--quick``) sends N as it is.
MIN_RUN_S: Dict[str, float] = {"full": 0.5, "quick": 0.0}
#: The sizing never makes N larger than this many times the workload's N.
MAX_GROWTH = 20


# -- one trial --------------------------------------------------------------------------------


def _pair(
    receivers: Dict[str, Any],
    senders: Dict[str, Any],
    kind: str,
    lib: str,
    n: int,
    xproc: bool,
    timeout: float,
    reader: str = "poll",
    sender: str = "write",
) -> Dict[str, Any]:
    """Set up a receiver/sender pair, warm it up, run ``n``; return both results."""
    params = {"timeout": timeout, "reader": reader, "sender": sender}
    if not xproc:
        r = s = None
        try:
            r = receivers[lib](kind, params)
            s = senders[lib](kind, params, r.port)
            s.warmup()
            r.wait_ready(deadline_in(timeout))
            sres = s.go(n)
            rres = r.measure(n, deadline_in(timeout))
        finally:
            close_quietly(s, r)
        return {"s": sres, "r": rres}
    rr = ss = None
    try:
        rr = Remote(receivers[lib], (kind, params))
        ss = Remote(senders[lib], (kind, params, rr.port))
        ss.call("warmup", timeout=timeout)
        rr.call("wait_ready", deadline_in(timeout), timeout=timeout + 5)
        rr.send("measure", n, deadline_in(timeout))
        ss.send("go", n)
        sres = ss.result(timeout + 5)
        rres = rr.result(timeout + 5)
    finally:
        shutdown_all(ss, rr)
    return {"s": sres, "r": rres}


def _elapsed(res: Dict[str, Any]) -> float:
    """Seconds from the sender's first value to the receiver's last."""
    return float(res["r"]["t_end"] - res["s"]["t0"])


def _round_up(x: float) -> int:
    """``x`` rounded up to two significant digits (1,234,567 -> 1,300,000)."""
    n = max(1, int(x + 0.999999))
    step = 10 ** max(0, len(str(n)) - 2)
    return -(-n // step) * step


def sized_n(cfg: Dict[str, Any], key: Any, lib: str, n0: int, run: Callable[[int], float]) -> int:
    """N for ``lib`` in the workload ``key``: ``n0``, or more if a run of ``n0`` is too short.

    ``run(n)`` does one run of ``n`` values and returns how long it lasted, in seconds.
    The first call per (workload, library) does one such sizing run of ``n0`` (not
    measured) when ``cfg["min_run_s"]`` is above 0; if it lasted less than that, N grows
    in proportion (rounded up to two significant digits, at most ``MAX_GROWTH`` times
    ``n0``).  Later calls return the same N, so every measured run of a library sends the
    same count.
    """
    chosen: Dict[Any, int] = cfg.setdefault("chosen_n", {})
    if (key, lib) in chosen:
        return chosen[(key, lib)]
    min_s = float(cfg.get("min_run_s", 0.0))
    n = n0
    if min_s > 0:
        elapsed = run(n0)
        if elapsed < min_s:
            n = min(n0 * MAX_GROWTH, _round_up(n0 * min_s / max(elapsed, 1e-6)))
        log(f"   sizing {lib}: N={n0} took {1000 * elapsed:.0f} ms -> N={n} per run")
    chosen[(key, lib)] = n
    return n


def _stream_metrics(kind: str, n: int, res: Dict[str, Any]) -> Dict[str, float]:
    elapsed = _elapsed(res)
    # Share of the run the sender spent in its send loop: ~100 % = sender-bound.
    sender_pct = 100.0 * (res["s"]["t_sent"] - res["s"]["t0"]) / elapsed
    if kind == "small":
        return {"msgs_per_s": n / elapsed, "sender_pct": sender_pct, "n": float(n)}
    # Image frames may be conflated (socketengine write_image): count what arrived.
    delivered = res["r"]["delivered"]
    return {
        "fps": delivered / elapsed,
        "gb_per_s": delivered * frame_nbytes() / elapsed / 1e9,
        "delivered_pct": 100.0 * delivered / n,
        "last_frame_ms": 1000.0 * elapsed,
        "sender_pct": sender_pct,
    }


def _latency_metrics(res: Dict[str, Any]) -> Dict[str, float]:
    lat = sorted(res["s"]["lat_ns"])
    return {
        "p50_us": percentile(lat, 50) / 1000.0,
        "p99_us": percentile(lat, 99) / 1000.0,
    }


def stream_trial(
    kind: str, xproc: bool, reader: str = "poll", sender: str = "write"
) -> Callable[[str, Dict[str, Any]], Dict[str, float]]:
    key = kind + ("_xproc" if xproc else "")

    def pair(lib: str, cfg: Dict[str, Any], n: int) -> Dict[str, Any]:
        return _pair(
            stream.RECEIVERS, stream.SENDERS, kind, lib, n, xproc, cfg["timeout"], reader, sender
        )

    def trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, float]:
        n = cfg["sizes"][key]
        if kind == "small":
            n = sized_n(cfg, (key, reader, sender), lib, n, lambda m: _elapsed(pair(lib, cfg, m)))
        return _stream_metrics(kind, n, pair(lib, cfg, n))

    return trial


def roundtrip_trial(
    xproc: bool, style: str = "poll"
) -> Callable[[str, Dict[str, Any]], Dict[str, float]]:
    key = "roundtrip" + ("_xproc" if xproc else "")
    server, pinger = roundtrip.STYLES[style]
    servers = {**roundtrip.SERVERS, SE: server}
    pingers = {**roundtrip.PINGERS, SE: pinger}

    def trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, float]:
        n = cfg["sizes"][key]
        res = _pair(servers, pingers, "ping", lib, n, xproc, cfg["timeout"])
        return _latency_metrics(res)

    return trial


def _fanout(runners: Dict[str, Any], key: str) -> Callable[[str, Dict[str, Any]], Dict[str, float]]:
    def trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, float]:
        sizes = cfg["sizes"]
        k, timeout = sizes["fanout_clients"], cfg["timeout"]

        run = runners[lib]
        n = sized_n(cfg, key, lib, sizes["fanout"], lambda m: run(m, k, timeout)["elapsed_s"])
        return {**run(n, k, timeout), "n": float(n)}

    return trial


fanout_trial = _fanout(fanout.RUNNERS, "fanout")
fanout_aio_trial = _fanout(fanout.AIO_RUNNERS, "fanout_aio")


def many_trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, float]:
    sizes = cfg["sizes"]
    return many.run(lib, sizes["many"], sizes["many_workers"], cfg["timeout"])


def jpeg_trial(
    xproc: bool, conflate: bool = True
) -> Callable[[str, Dict[str, Any]], Dict[str, float]]:
    key = "jpeg" + ("_xproc" if xproc else "")

    def trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, float]:
        return jpeg.throughput_trial(lib, cfg["sizes"][key], xproc, cfg["timeout"], conflate)

    return trial


def slow_receiver_trial(lib: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    sizes = cfg["sizes"]
    return jpeg.slow_receiver_trial(
        lib,
        sizes["slow_receiver"] / 1000.0,
        float(sizes["slow_fps"]),
        sizes["slow_work_ms"] / 1000.0,
        cfg["timeout"],
    )


_SENDER = Metric("sender_pct", "% of run in send loop", False, chart=False, ratio=False)
_N = Metric("n", "values sent per run (sized by time)", True, chart=False, ratio=False)
_THROUGHPUT = [Metric("msgs_per_s", "msgs/s", True), _SENDER, _N]
_FANOUT = [Metric("deliveries_per_s", "deliveries/s", True), _N]
_IMAGES = [
    Metric("fps", "delivered frames/s", True, chart=False),
    Metric("gb_per_s", "delivered GB/s", True, chart=False),
    Metric("last_frame_ms", "ms until the last frame is in", False),
    Metric("delivered_pct", "% of frames delivered", True, chart=False, ratio=False),
    _SENDER,
]
_ARRAYS = [
    Metric("fps", "frames/s", True, chart=False),
    Metric("gb_per_s", "GB/s", True),
    Metric("delivered_pct", "% of frames delivered", True, chart=False, ratio=False),
    _SENDER,
]
_LATENCY = [Metric("p50_us", "us", False), Metric("p99_us", "us", False, chart=False)]
_JPEG = [
    Metric("fps", "frames/s delivered and decoded", True),
    Metric("last_frame_ms", "ms until the last frame is decoded", False, chart=False),
    Metric("delivered_pct", "% of frames delivered", True, chart=False, ratio=False),
    _SENDER,
]
_SLOW = [
    Metric("age_last_ms", "ms, median age of the frames handled in the last second", False),
    Metric("age_last_max_ms", "ms, max age in the last second", False, chart=False),
    Metric("age_first_ms", "ms, median age in the first second", False, chart=False),
    Metric("age_growth_ms", "ms, last minus first second", False, chart=False, ratio=False),
    Metric("send_fps", "frames/s the camera sent", True, chart=False, ratio=False),
    Metric("handled_fps", "frames/s the receiver handled", True, chart=False, ratio=False),
    Metric("backlog_end", "frames still queued at the end", False, chart=False, ratio=False),
]

WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "small",
            "small messages [seq, 100-byte str], client -> host",
            _THROUGHPUT,
            "small",
            stream_trial("small", False),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip",
            "ping -> echo -> pong round trip (socketengine: polling get())",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "images",
            "1080x1920x3 uint8 frames, client -> host (socketengine: write_image, may conflate)",
            _IMAGES,
            "images",
            stream_trial("images", False),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "arrays",
            "1080x1920x3 uint8 frames, client -> host (socketengine: write(ch, ndarray))",
            _ARRAYS,
            "arrays",
            stream_trial("arrays", False),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "fanout",
            "host -> 20 clients, small messages",
            _FANOUT,
            "fanout",
            fanout_trial,
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "many",
            "idle clients connecting to one host",
            [
                Metric("connect_s", "s", False, panel="cost"),
                Metric("rss_per_conn_kb", "kB", False, panel="cost"),
                Metric("host_threads", "threads", False, chart=False),
                Metric("host_rss_mb", "MB", False, chart=False),
                Metric("client_side_rss_mb", "MB", False, chart=False),
            ],
            "many",
            many_trial,
            BASE_LIBS,
            "host process + 4 client processes",
        ),
        Workload(
            "small_xproc",
            "small messages, host and client in separate processes",
            _THROUGHPUT,
            "small_xproc",
            stream_trial("small", True),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "small_many",
            "small messages, socketengine client.write_many (1,000 a call; pyzmq and raw "
            "TCP: one send each, they have no batch of separate messages)",
            _THROUGHPUT,
            "small",
            stream_trial("small", False, sender="many"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "small_many_xproc",
            "small messages with client.write_many (1,000 a call), separate processes",
            _THROUGHPUT,
            "small_xproc",
            stream_trial("small", True, sender="many"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "small_aio",
            "small messages from a coroutine: await aio.Client.write (pyzmq: zmq.asyncio "
            "PUSH await send; raw TCP: asyncio StreamWriter write + await drain)",
            _THROUGHPUT,
            "small",
            stream_trial("small", False, sender="aio"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "small_aio_xproc",
            "small messages from a coroutine (as small_aio), separate processes",
            _THROUGHPUT,
            "small_xproc",
            stream_trial("small", True, sender="aio"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "small_aio_host",
            "small messages, threaded client -> an asyncio receiver: aio.Host (pyzmq: "
            "zmq.asyncio PULL await recv; raw TCP: asyncio server, StreamReader.readexactly)",
            _THROUGHPUT,
            "small",
            stream_trial("small", False, "aio"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "small_aio_host_xproc",
            "small messages to an asyncio receiver (as small_aio_host), separate processes",
            _THROUGHPUT,
            "small_xproc",
            stream_trial("small", True, "aio"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "fanout_aio",
            "host -> 20 clients, small messages from a coroutine: await aio.Host.write_all "
            "(pyzmq: zmq.asyncio PUB; raw TCP: a StreamWriter per client)",
            _FANOUT,
            "fanout",
            fanout_aio_trial,
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "images_xproc",
            "1080p frames, host and client in separate processes",
            _IMAGES,
            "images_xproc",
            stream_trial("images", True),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "arrays_xproc",
            "1080p frames with write(ch, ndarray), separate processes",
            _ARRAYS,
            "arrays_xproc",
            stream_trial("arrays", True),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "arrays_wait",
            "1080p frames with write(ch, ndarray); the host reads with host.wait(ch)",
            _ARRAYS,
            "arrays",
            stream_trial("arrays", False, "wait"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "arrays_xproc_wait",
            "1080p frames with write(ch, ndarray), separate processes; host.wait(ch) reader",
            _ARRAYS,
            "arrays_xproc",
            stream_trial("arrays", True, "wait"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "arrays_xproc_busy",
            "1080p frames, separate processes; the seed's no-sleep "
            "`while True: h.get_ALL(ch)` reader",
            _ARRAYS,
            "arrays_xproc",
            stream_trial("arrays", True, "busy"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "roundtrip_xproc",
            "round trip, separate processes (socketengine: polling get())",
            _LATENCY,
            "roundtrip_xproc",
            roundtrip_trial(True),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "roundtrip_sub",
            "round trip, socketengine blocking in subscribe().get() on both sides",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False, "sub"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip_sub_xproc",
            "round trip as roundtrip_sub, separate processes",
            _LATENCY,
            "roundtrip_xproc",
            roundtrip_trial(True, "sub"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "roundtrip_req",
            "round trip, socketengine client.request() answered by host.on()",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False, "req"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip_req_inline",
            "round trip, client.request() answered by host.on(..., inline=True)",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False, "req_inline"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip_aio_req",
            "round trip, await aio.Client.request() answered by host.on(..., inline=True)",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False, "aio_req"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip_aio_req_xproc",
            "round trip, await aio.Client.request(), separate processes",
            _LATENCY,
            "roundtrip_xproc",
            roundtrip_trial(True, "aio_req"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "roundtrip_echo_wait",
            "round trip, host.on(..., inline=True) echoes with conn.write; "
            "the client writes and blocks in client.wait()",
            _LATENCY,
            "roundtrip",
            roundtrip_trial(False, "echo_wait"),
            BASE_LIBS,
            "1 process",
        ),
        Workload(
            "roundtrip_echo_wait_xproc",
            "round trip, inline on() echo + client.wait(), separate processes",
            _LATENCY,
            "roundtrip_xproc",
            roundtrip_trial(True, "echo_wait"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "roundtrip_req_xproc",
            "round trip, client.request() / host.on(), separate processes",
            _LATENCY,
            "roundtrip_xproc",
            roundtrip_trial(True, "req"),
            BASE_LIBS,
            "2 processes",
        ),
        Workload(
            "jpeg",
            "1080p colour frames as JPEG q90 (simplejpeg), every frame decoded; "
            "socketengine write_image vs imagezmq send_jpg",
            _JPEG,
            "jpeg",
            jpeg_trial(False),
            jpeg.LIBS,
            "1 process",
            jpeg.missing,
        ),
        Workload(
            "jpeg_xproc",
            "1080p JPEG q90 frames, every frame decoded, separate processes",
            _JPEG,
            "jpeg_xproc",
            jpeg_trial(True),
            jpeg.LIBS,
            "2 processes",
            jpeg.missing,
        ),
        Workload(
            "jpeg_lossless_xproc",
            "1080p JPEG q90, every frame (write_image(conflate=False): lossless, "
            "backpressure) vs imagezmq REQ/REP and PUB/SUB, separate processes",
            _JPEG,
            "jpeg_xproc",
            jpeg_trial(True, conflate=False),
            jpeg.LIBS,
            "2 processes",
            jpeg.missing,
        ),
        Workload(
            "slow_receiver",
            "camera at 30 fps (JPEG q90) -> receiver taking 100 ms per frame: "
            "age of the frames it handles (N = ms of sending)",
            _SLOW,
            "slow_receiver",
            slow_receiver_trial,
            jpeg.LIBS,
            "2 processes",
            jpeg.missing,
        ),
    ]
}
