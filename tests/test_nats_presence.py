"""Hosts listing and client presence, on a real 3-node cluster."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from typing import Any, Tuple

from nats_fixtures import *  # noqa: F403
from nats_fixtures import LocalCluster

from socketengine.transport.nats.presence import (
    ClientHeartbeat,
    HostAnnouncer,
    PresenceMonitor,
    PresenceTable,
    list_hosts,
)
from socketengine.transport.nats.retained import retry_transient


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_presence_table() -> None:
    t = PresenceTable(timeout=2.0)
    assert t.beat("a", 0.0) and not t.beat("a", 1.0) and t.beat("b", 2.0)
    assert t.expire(3.0) == [] and t.expire(3.1) == ["a"]
    assert t.bye("b") and not t.bye("b") and t.clients == []


def test_list_hosts_and_expiry(nats_cluster: LocalCluster, make_link: Any) -> None:
    prefix = f"t{os.urandom(3).hex()}"
    a = make_link(nats_cluster.nodes[0].url)
    b = make_link(nats_cluster.nodes[1].url)
    c = make_link(nats_cluster.nodes[2].url)
    ha = HostAnnouncer(a, "cam.1", {"port": 1}, prefix=prefix, ttl=2.0)
    HostAnnouncer(b, "cam *2", prefix=prefix, ttl=2.0)

    # Written through nodes A and B, read through C: the bucket's replicas catch up.
    def both() -> Any:
        listed = list_hosts(c, prefix=prefix)
        return listed if set(listed) == {"cam.1", "cam *2"} else None

    hosts = wait_until(both, 10, "both hosts to be listed through node C")
    assert hosts["cam.1"]["port"] == 1
    ha.stop()  # goodbye: gone without waiting for the TTL
    wait_until(
        lambda: set(list_hosts(c, prefix=prefix)) == {"cam *2"}, 10, "the goodbye to be seen"
    )
    b.close()  # dies without goodbye: its entry expires after the TTL
    t0 = time.monotonic()
    wait_until(lambda: list_hosts(c, prefix=prefix) == {}, 15, "the dead host to expire")
    # Gone within the TTL (2 s) after its last refresh, plus the server's expiry sweep.
    # (How long it stayed listed depends on when it last refreshed: no lower bound.)
    assert time.monotonic() - t0 < 2.0 + 5.0
    c.run(_delete_bucket(c.aio, f"{prefix}_hosts"))


async def _delete_bucket(link: Any, name: str) -> None:
    # Deleting a replicated bucket needs the cluster's meta leader, which a loaded
    # machine may leave unanswered for a moment: retried like the library's own calls.
    await retry_transient(lambda: link.nc.jetstream().delete_key_value(name), 10.0)


def collect() -> Tuple[queue.Queue[Tuple[str, ...]], Any, Any]:
    q: queue.Queue[Tuple[str, ...]] = queue.Queue()
    return q, (lambda c: q.put(("join", c))), (lambda c, why: q.put(("leave", c, why)))


def test_goodbye(nats_cluster: LocalCluster, make_link: Any) -> None:
    host = f"h-{os.urandom(3).hex()}"
    q, join, leave = collect()
    mon_link = make_link(nats_cluster.nodes[0].url)
    mon = PresenceMonitor(mon_link, host, timeout=1.0, on_join=join, on_leave=leave)
    cl = make_link(nats_cluster.nodes[2].url)
    # No need to wait for the subscription to cross the routes: heartbeats repeat.
    hb = ClientHeartbeat(cl, host, "client 1", interval=0.2)
    assert q.get(timeout=10) == ("join", "client 1")
    assert mon.clients == ["client 1"]
    hb.stop()
    assert q.get(timeout=10) == ("leave", "client 1", "goodbye")
    mon.stop()


CLIENT = """
import sys, threading
from socketengine.transport.nats.link import NatsLink
from socketengine.transport.nats.presence import ClientHeartbeat
link = NatsLink()
link.connect(sys.argv[1])
ClientHeartbeat(link, sys.argv[2], "doomed", interval=0.2)
print("ready", flush=True)
sys.stdin.read()
"""


def test_killed_client_is_reported_gone(nats_cluster: LocalCluster, make_link: Any) -> None:
    host = f"h-{os.urandom(3).hex()}"
    q, join, leave = collect()
    mon = PresenceMonitor(
        make_link(nats_cluster.nodes[0].url), host, timeout=1.0, on_join=join, on_leave=leave
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, nats_cluster.nodes[1].url, host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert q.get(timeout=15) == ("join", "doomed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        assert q.get(timeout=10) == ("leave", "doomed", "timeout")
        gone_after = time.monotonic() - killed
        # The bound is timeout + timeout/4 after the last heartbeat (1.25 s here); the
        # check is loose (loaded machine) but proves the report is not open-ended.
        assert gone_after < 8, gone_after
        print(f"killed client reported gone {gone_after:.2f} s after the kill")
        assert mon.clients == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        mon.stop()
