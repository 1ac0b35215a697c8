"""Failure probes: what the code loses under cuts, kills, floods and memory abuse.

``python -m bench.probes`` (from the repository root) runs every probe, one at a time,
and writes ``bench/scratch/probes.json`` (not committed).  These are measurements, not
tests: today's code fails several of them, and they take minutes, so they are not part
of pytest.  Everything is on 127.0.0.1 and bounded in time.

    python -m bench.probes --only cuts,bulk --runs 2 --out /tmp/p.json
    python -m bench.probes --only cuts --default-heartbeat      # heartbeat=5.0 as well
    python -m bench.probes --list

Probes (see docs/guarantees.md, "Measured failure behaviour"):

* ``cuts``: 20,000 sequenced values at ~600/s through a proxy that cuts the link 20
  times (8 clean closes, 8 resets, 4 blackholes); lost / duplicated / out of order.
* ``cut_kinds`` / ``cut_kinds_aio``: 20 cuts of each kind (close, reset, blackhole)
  while a client writes sequenced values at ~600/s to the host and the host writes
  sequenced values to the client (``write_all``, counted when it reached the client's
  connection), with the threaded and the asyncio layer; lost / duplicated / out of
  order, per direction and per cut kind.
* ``bulk``: 400 x 64 KiB written into a blackholed link; how many arrive.
* ``kill``: 30 SIGKILL-and-restart cycles of a host process with 200 clients in 4
  processes; clients that never come back.
* ``flood``: 2,000 connections that never finish the handshake; how many of 26
  connection tries of a client with the right token get in.
* ``memory``: host RSS for 1,000,000 distinct channels, 12 x 60 MB values, a
  subscriber that never reads, and the transient cost of receiving a 50 MB value.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from tests.faults import (
    ClientsProcess,
    CuttingProxy,
    HandshakeFlooder,
    HostProcess,
    RawClient,
    flood_channels,
    raise_fd_limit,
)

from socketengine import Client, Host, WriteTimeout

MB = 1_000_000
Result = Dict[str, Any]


def _wait(cond: Callable[[], Any], timeout: float) -> bool:
    """Poll ``cond`` until true or ``timeout`` s; returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sequence_stats(got: List[int], n: int) -> Result:
    seen = set(got)
    out_of_order = sum(1 for a, b in zip(got, got[1:]) if b < a)
    return {
        "written": n,
        "received": len(got),
        "lost": n - len(seen & set(range(n))),
        "duplicated": len(got) - len(seen),
        "out_of_order": out_of_order,
    }


class _Collector:
    """Reads every value of a host subscription in a thread."""

    def __init__(self, host: Host, channel: str, key: Callable[[Any], int] = int) -> None:
        self.sub = host.subscribe(channel, maxsize=1_000_000)
        self.got: List[int] = []
        self.key = key
        self.last_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value, _ = self.sub.get(timeout=0.2)
            except Exception:  # timeout (queue empty) or the host closed
                continue
            self.got.append(self.key(value))
            self.last_at = time.monotonic()

    def settle(self, last: int, quiet: float, timeout: float) -> None:
        """Until ``last`` arrived, or nothing arrived for ``quiet`` s, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.got and self.got[-1] == last:
                break
            if time.monotonic() - self.last_at > quiet:
                break
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- a. cuts -------------------------------------------------------------------------


def probe_cuts(heartbeat: float, n: int = 20_000, rate: float = 600.0) -> Result:
    """20,000 values at ``rate``/s through 20 cuts: 8 closes, 8 resets, 4 blackholes."""
    events = ["close", "reset"] * 4 + ["blackhole"] + ["close", "reset"] * 4 + ["blackhole"] * 3
    random.Random(1).shuffle(events)
    h = Host(port=0, heartbeat=heartbeat, open=False)
    collector = _Collector(h, "n")
    h.open()
    proxy = CuttingProxy(h.port)
    c = Client(port=proxy.port, heartbeat=heartbeat, name="seq")
    errors: Dict[str, int] = {}
    done = threading.Event()
    cut_log: List[Tuple[str, int, float, int]] = []  # kind, links cut, seconds, next seq
    next_seq = [0]

    def cutter() -> None:
        period = n / rate / (len(events) + 1)
        start = time.monotonic()
        for k, event in enumerate(events):
            due = start + (k + 1) * period
            while time.monotonic() < due and not done.is_set():
                time.sleep(0.01)
            _wait(lambda: c.connected and proxy.links > 0, 15)  # a live link to cut
            t0 = time.monotonic()
            at = next_seq[0]
            if event == "blackhole":
                proxy.blackhole()
                # Until the client's heartbeat gives the link up (3 x heartbeat), then
                # the partition ends: the peers' old connections get resets.
                _wait(lambda: not c.connected, 3 * heartbeat + 5)
                links = proxy.cut_reset()
            else:
                links = proxy.cut(event)
            cut_log.append((event, links, round(time.monotonic() - t0, 3), at))

    t = threading.Thread(target=cutter, daemon=True)
    start = time.monotonic()
    t.start()
    interval = 1.0 / rate
    for i in range(n):
        due = start + i * interval
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the writer, not synchronisation
        try:
            c.write("n", i)
            next_seq[0] = i + 1
        except Exception as exc:  # counted: a write the application saw fail
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    write_s = time.monotonic() - start
    t.join(3 * heartbeat * 4 + 120)
    done.set()
    try:
        c.flush(30)
    except Exception as exc:
        errors["flush:" + type(exc).__name__] = 1
    collector.settle(n - 1, quiet=3.0, timeout=60)
    total_s = time.monotonic() - start
    collector.stop()
    result = _sequence_stats(collector.got, n)
    # Each lost value is blamed on the last cut that began before it was written.
    marks = [entry[3] for entry in cut_log]
    lost_by_kind: Dict[str, int] = {}
    for v in set(range(n)) - set(collector.got):
        k = bisect.bisect_right(marks, v) - 1
        kind = cut_log[k][0] if k >= 0 else "before any cut"
        lost_by_kind[kind] = lost_by_kind.get(kind, 0) + 1
    result.update(
        lost_by_cut_kind=lost_by_kind,
        heartbeat=heartbeat,
        rate=rate,
        write_errors=errors,
        cuts=cut_log,
        reconnects=c.reconnects,
        write_seconds=round(write_s, 1),
        seconds=round(total_s, 1),
        proxy_bytes_up=proxy.bytes_up,
    )
    result["lost_pct"] = round(100 * result["lost"] / n, 2)
    c.close()
    proxy.close()
    h.close()
    return result


# -- a2. 20 cuts of each kind, both directions, either layer --------------------------------


class _Layer:
    """A host and a client of either layer, driven with blocking calls."""

    def __init__(self, layer: str, heartbeat: float, proxy_of: Callable[[int], Any]) -> None:
        self.layer = layer
        self.loop: Any = None
        if layer == "aio":
            import asyncio

            from socketengine import aio

            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()
            self.host = self.run(aio.Host(port=0, heartbeat=heartbeat).start())
            self.proxy = proxy_of(self.host.port)
            self.client = self.run(
                aio.Client(port=self.proxy.port, heartbeat=heartbeat, name="seq").start()
            )
        else:
            self.host = Host(port=0, heartbeat=heartbeat)
            self.proxy = proxy_of(self.host.port)
            self.client = Client(port=self.proxy.port, heartbeat=heartbeat, name="seq")

    def run(self, aw: Any) -> Any:
        import asyncio

        async def wrapper() -> Any:
            return await aw

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(60)

    def do(self, obj: Any, name: str, *args: Any) -> Any:
        result = getattr(obj, name)(*args)
        if self.loop is not None and hasattr(result, "__await__"):
            return self.run(result)
        return result

    def close(self) -> None:
        for obj in (self.client, self.host):
            try:
                self.do(obj, "close")
            except Exception:  # measuring, not testing: closing is best effort
                pass
        self.proxy.close()
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def probe_cut_kinds(
    layer: str, heartbeat: float = 0.5, per_kind: int = 20, rate: float = 600.0
) -> Result:
    """``per_kind`` cuts of each kind (close, reset, blackhole), shuffled, about every
    0.5 s, while values flow both ways at ``rate``/s."""
    events = ["close", "reset", "blackhole"] * per_kind
    random.Random(2).shuffle(events)
    ends = _Layer(layer, heartbeat, CuttingProxy)
    host, client, proxy = ends.host, ends.client, ends.proxy
    up: List[int] = []
    down: List[int] = []
    host.on("n", lambda value, *rest: up.append(value))
    client.on("d", lambda value, *rest: down.append(value))
    errors: Dict[str, int] = {}
    done = threading.Event()
    cut_log: List[Tuple[str, int, float, int, int]] = []  # kind, links, s, next up, next down
    next_up = [0]
    next_down = [0]

    def cutter() -> None:
        for event in events:
            _wait(lambda: client.connected and proxy.links > 0, 15)  # a live link to cut
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                time.sleep(0.01)  # values flow for a while between cuts
            t0 = time.monotonic()
            at = (next_up[0], next_down[0])
            if event == "blackhole":
                proxy.blackhole()
                _wait(lambda: not client.connected, 3 * heartbeat + 5)
                links = proxy.cut_reset()  # the partition ends
            else:
                links = proxy.cut(event)
            cut_log.append((event, links, round(time.monotonic() - t0, 3), *at))
        done.set()

    t = threading.Thread(target=cutter, daemon=True)
    start = time.monotonic()
    t.start()
    interval = 1.0 / rate
    i = 0
    while not done.is_set() and time.monotonic() - start < 600:
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the writers, not synchronisation
        try:
            ends.do(client, "write", "n", i)
            next_up[0] = i + 1
        except Exception as exc:  # counted: a write the application saw fail
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        try:
            if ends.do(host, "write_all", "d", next_down[0]):
                next_down[0] += 1
        except Exception as exc:
            errors["host:" + type(exc).__name__] = errors.get("host:" + type(exc).__name__, 0) + 1
        i += 1
    n_up, n_down = next_up[0], next_down[0]
    _wait(lambda: len(up) >= n_up and len(down) >= n_down, 30)
    total_s = time.monotonic() - start
    result: Result = {"layer": layer, "heartbeat": heartbeat, "rate": rate}
    result["client_to_host"] = _sequence_stats(list(up), n_up)
    result["host_to_client"] = _sequence_stats(list(down), n_down)
    for name, got, n, col in (("client_to_host", up, n_up, 3), ("host_to_client", down, n_down, 4)):
        marks = [entry[col] for entry in cut_log]
        by_kind: Dict[str, int] = {}
        for v in set(range(n)) - set(got):
            k = bisect.bisect_right(marks, v) - 1
            kind = cut_log[k][0] if k >= 0 else "before any cut"
            by_kind[kind] = by_kind.get(kind, 0) + 1
        result[name]["lost_by_cut_kind"] = by_kind
    result.update(
        cuts={kind: events.count(kind) for kind in ("close", "reset", "blackhole")},
        write_errors=errors,
        reconnects=client.reconnects,
        seconds=round(total_s, 1),
    )
    ends.close()
    return result


# -- b. bulk into a blackhole ------------------------------------------------------------


def probe_bulk(heartbeat: float = 0.5, n: int = 400, size: int = 64 * 1024) -> Result:
    h = Host(port=0, heartbeat=heartbeat, open=False)
    collector = _Collector(h, "bulk", key=lambda v: int(v[0]))
    h.open()
    proxy = CuttingProxy(h.port)
    c = Client(port=proxy.port, heartbeat=heartbeat, name="bulk")
    payload = os.urandom(size)
    errors: Dict[str, int] = {}
    proxy.blackhole()
    t0 = time.monotonic()
    for i in range(n):
        try:
            c.write("bulk", [i, payload])
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    write_s = time.monotonic() - t0
    noticed = _wait(lambda: not c.connected, 3 * heartbeat + 5)
    proxy.cut_reset()  # the partition ends
    back = _wait(lambda: c.connected, 30)
    try:
        c.flush(30)
    except Exception as exc:
        errors["flush:" + type(exc).__name__] = 1
    collector.settle(n - 1, quiet=3.0, timeout=60)
    collector.stop()
    result = _sequence_stats(collector.got, n)
    result.update(
        value_bytes=size,
        heartbeat=heartbeat,
        write_seconds=round(write_s, 2),
        write_errors=errors,
        client_noticed=noticed,
        reconnected=back,
        reconnects=c.reconnects,
    )
    c.close()
    proxy.close()
    h.close()
    return result


# -- c. kill -9 and restart --------------------------------------------------------------


def probe_kill(
    cycles: int = 30,
    clients: int = 200,
    processes: int = 4,
    reconnect_max: float = 1.0,
    log_dir: Path = Path("bench/scratch"),
) -> Result:
    """Kill the host while clients reconnect; count clients that never come back."""
    rnd = random.Random()
    host = HostProcess(heartbeat=0.5, max_clients=clients + 16)
    port = host.start()
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    paths = [log_dir / f"kill-clients-{stamp}-{k}.log" for k in range(processes)]
    logs = [open(path, "w") for path in paths]
    procs = [
        ClientsProcess(
            port,
            clients // processes,
            prefix=f"p{k}-",
            stderr=logs[k],
            log_level="INFO",  # failed attempts are logged at INFO once handled
            heartbeat=0.5,
            reconnect_max=reconnect_max,
        )
        for k in range(processes)
    ]

    def down() -> List[str]:
        return [name for p in procs for name in p.status()[0]]

    try:
        all_up = _wait(lambda: not down(), 30)
        assert all_up, "the clients did not connect in the first place"
        recovered_waits: List[float] = []
        for cycle in range(cycles):
            if cycle % 5 == 4:  # every fifth cycle: kill a fully reconnected host
                t0 = time.monotonic()
                if _wait(lambda: not down(), 15):
                    recovered_waits.append(time.monotonic() - t0)
            else:  # otherwise kill during the reconnection storm
                time.sleep(rnd.uniform(0.02, 0.6))
            host.kill()
            time.sleep(rnd.uniform(0.0, 0.3))  # the host stays down a little while
            host.start()
        t0 = time.monotonic()
        _wait(lambda: not down(), 6 * reconnect_max + 10)
        final_wait = time.monotonic() - t0
        stuck = down()
        reconnects = sum(p.status()[1] for p in procs)
    finally:
        for p in procs:
            p.stop()
        host.kill()
        for f in logs:
            f.close()
    handler_errors = 0
    enotconn = 0
    enotconn_retried = 0
    for path in paths:
        text = path.read_text(errors="replace")
        handler_errors += text.count("error in I/O handler") + text.count("error in loop call")
        enotconn += text.count("Errno 107")  # raised, or handled and retried
        enotconn_retried += sum(
            1 for line in text.splitlines() if "attempt failed" in line and "Errno 107" in line
        )
    return {
        "cycles": cycles,
        "clients": clients,
        "processes": processes,
        "reconnect_max": reconnect_max,
        "stuck": len(stuck),
        "stuck_names": stuck,
        "reconnects": reconnects,
        "final_wait_s": round(final_wait, 2),
        "io_handler_errors_logged": handler_errors,
        "enotconn_logged": enotconn,
        "enotconn_retried": enotconn_retried,
    }


# -- d. handshake flood ------------------------------------------------------------------


def probe_flood(
    mode: str = "idle",
    count: int = 2000,
    tries: int = 26,
    try_timeout: float = 3.0,
    spacing: float = 1.0,
) -> Result:
    raise_fd_limit(count + 1024)
    token = "right-token"
    host = HostProcess(token=token)
    port = host.start()
    got_in = 0
    failures: Dict[str, int] = {}
    durations: List[float] = []
    try:
        with HandshakeFlooder(port, count, mode=mode, duration=600) as flood:
            flood.wait_established(count, timeout=60)
            first = time.monotonic()
            for k in range(tries):
                # One try a second: the tries span several handshake timeouts of the flood.
                while time.monotonic() < first + k * spacing:
                    time.sleep(0.01)
                t0 = time.monotonic()
                try:
                    c = Client(
                        port=port,
                        token=token,
                        timeout=try_timeout,
                        connect_timeout=try_timeout,
                        handshake_timeout=try_timeout,
                        reconnect=False,
                    )
                    got_in += 1
                    c.close()
                except Exception as exc:
                    key = type(exc).__name__
                    failures[key] = failures.get(key, 0) + 1
                durations.append(time.monotonic() - t0)
            stats = {
                "flood_opened": flood.opened,
                "flood_established": flood.established,
                "flood_closed_by_host": flood.closed_by_host,
                "flood_open_at_end": flood.open_now,
            }
    finally:
        host.kill()
    return {
        "mode": mode,
        "flood_connections": count,
        "tries": tries,
        "got_in": got_in,
        "failures": failures,
        "try_timeout_s": try_timeout,
        "try_spacing_s": spacing,
        "median_try_s": round(statistics.median(durations), 2),
        **stats,
    }


# -- e. memory -----------------------------------------------------------------------------


def _counts(port: int) -> Dict[str, int]:
    with Client(port=port, name="probe-observer", heartbeat=None) as obs:
        return dict(obs.request("_faults.counts", None, timeout=30))


def _names(port: int) -> List[str]:
    with Client(port=port, name="probe-observer", heartbeat=None) as obs:
        return list(obs.request("_faults.clients", None, timeout=30))


def _settled_rss(host: HostProcess, timeout: float = 20.0) -> int:
    """RSS once it stopped changing by more than 1 MB over 0.5 s (bounded)."""
    deadline = time.monotonic() + timeout
    last = host.rss()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = host.rss()
        if abs(now - last) < MB:
            return now
        last = now
    return host.rss()


def probe_memory_channels(n: int = 1_000_000) -> Result:
    host = HostProcess(heartbeat=None, count=["_faults.done"])
    port = host.start()
    try:
        raw = RawClient(port, name="channels")
        base = _settled_rss(host)
        t0 = time.monotonic()
        sent = 0
        for start in range(0, n, 50_000):
            sent += flood_channels(raw, min(50_000, n - start), prefix="ch", value=0, start=start)
        raw.send_values([("_faults.done", 1)])
        _wait(lambda: _counts(port).get("_faults.done") == 1, 300)
        seconds = time.monotonic() - t0
        full = _settled_rss(host)
        raw.close()
        _wait(lambda: "channels" not in _names(port), 30)
        after = _settled_rss(host)
    finally:
        host.kill()
    return {
        "channels": n,
        "bytes_sent": sent,
        "seconds": round(seconds, 1),
        "rss_base_mb": round(base / MB, 1),
        "rss_growth_mb": round((full - base) / MB, 1),
        "bytes_per_channel": round((full - base) / n),
        "rss_after_client_left_mb": round((after - base) / MB, 1),
    }


def probe_memory_big_values(count: int = 12, size: int = 60 * MB) -> Result:
    host = HostProcess(count=["_faults.done"])
    port = host.start()
    try:
        base = _settled_rss(host)
        with Client(port=port, name="big", timeout=30) as c:
            for i in range(count):
                c.write(f"big{i}", os.urandom(1024) * (size // 1024))
            c.write("_faults.done", 1)
            c.flush(60)
            _wait(lambda: _counts(port).get("_faults.done") == 1, 120)
            full = _settled_rss(host)
        _wait(lambda: "big" not in _names(port), 30)
        after = _settled_rss(host)
    finally:
        host.kill()
    return {
        "values": count,
        "value_bytes": size,
        "rss_growth_mb": round((full - base) / MB, 1),
        "rss_after_client_left_mb": round((after - base) / MB, 1),
    }


def probe_memory_never_read(size: int = 64 * 1024, limit: int = 12_000) -> Result:
    host = HostProcess(never_read=["s"], count=[])
    port = host.start()
    written = 0
    error = None
    try:
        base = _settled_rss(host)
        with Client(port=port, name="writer", timeout=5) as c:
            payload = os.urandom(size)
            t0 = time.monotonic()
            try:
                for _ in range(limit):
                    c.write("s", payload)
                    written += 1
                    if time.monotonic() - t0 > 120:
                        break
                c.flush(10)
            except WriteTimeout as exc:
                error = type(exc).__name__
            full = _settled_rss(host)  # the writer is still connected
    finally:
        host.kill()
    return {
        "value_bytes": size,
        "written": written,
        "write_limit": limit,
        "writer_error": error,
        "rss_growth_mb": round((full - base) / MB, 1),
        "rss_growth_per_value_bytes": round((full - base) / max(written, 1)),
    }


def probe_memory_receive(size: int = 50 * MB) -> Result:
    host = HostProcess(count=["big"])
    port = host.start()
    try:
        base = _settled_rss(host)
        base_peak = host.peak_rss()
        with Client(port=port, name="one", timeout=30) as c:
            c.write("big", os.urandom(1024) * (size // 1024))
            c.flush(60)
            _wait(lambda: _counts(port).get("big") == 1, 120)
        peak = host.peak_rss()
        after = _settled_rss(host)
    finally:
        host.kill()
    return {
        "value_bytes": size,
        "rss_base_mb": round(base / MB, 1),
        "peak_growth_mb": round((peak - max(base, base_peak)) / MB, 1),
        "peak_over_size": round((peak - base) / size, 2),
        "rss_after_mb": round((after - base) / MB, 1),
    }


def probe_memory() -> Result:
    out: Result = {}
    for name, fn in (
        ("channels", probe_memory_channels),
        ("big_values", probe_memory_big_values),
        ("never_read", probe_memory_never_read),
        ("receive_50mb", probe_memory_receive),
    ):
        _log(f"memory/{name}")
        out[name] = fn()
    return out


# -- driver ---------------------------------------------------------------------------------

PROBES: Dict[str, Callable[[argparse.Namespace], Result]] = {
    "cuts": lambda a: probe_cuts(heartbeat=0.5),
    "cut_kinds": lambda a: probe_cut_kinds("sync"),
    "cut_kinds_aio": lambda a: probe_cut_kinds("aio"),
    "bulk": lambda a: probe_bulk(),
    "kill": lambda a: probe_kill(),
    "flood": lambda a: probe_flood("idle"),
    "flood_drip": lambda a: probe_flood("drip"),
    "memory": lambda a: probe_memory(),
}


def _git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probes", description=__doc__)
    parser.add_argument("--only", default=",".join(PROBES), help="comma-separated probes")
    parser.add_argument("--runs", type=int, default=2, help="runs of each probe")
    parser.add_argument("--out", default="bench/scratch/probes.json")
    parser.add_argument(
        "--default-heartbeat", action="store_true", help="also run cuts with heartbeat=5.0"
    )
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(PROBES))
        return 0
    logging.basicConfig(level=logging.CRITICAL)  # the probes provoke errors on purpose
    names = [p for p in args.only.split(",") if p]
    results: Result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _git_head(),
        "python": sys.version.split()[0],
        "nproc": os.cpu_count(),
        "probes": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    todo: List[Tuple[str, Callable[[], Result]]] = []
    for name in names:
        todo.append((name, lambda name=name: PROBES[name](args)))
        if name == "cuts" and args.default_heartbeat:
            todo.append(("cuts_default_heartbeat", lambda: probe_cuts(heartbeat=5.0)))
    for name, fn in todo:
        runs = []
        for run in range(args.runs):
            _log(f"{name} run {run + 1}/{args.runs}")
            t0 = time.monotonic()
            try:
                r = fn()
            except Exception as exc:  # a probe that breaks is a result too
                r = {"error": f"{type(exc).__name__}: {exc}"}
            r["probe_seconds"] = round(time.monotonic() - t0, 1)
            _log(f"{name}: {json.dumps(r)[:600]}")
            runs.append(r)
            results["probes"][name] = runs
            out.write_text(json.dumps(results, indent=1))  # after every run: nothing lost
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
