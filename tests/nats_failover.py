"""Measure NATS failover: how long clients of a dying node are cut off, what is lost.

Run: ``python tests/nats_failover.py [--runs 5]`` (starts its own 3-node cluster).

A publisher sends numbered frames every ``--period`` seconds on one subject; a
subscriber receives them.  Scenario *sub*: the subscriber is connected to node B, the
publisher to node A; node B is killed (SIGKILL).  Scenario *pub*: the publisher is on
node B.  Reported per run: the gap (time from the kill to the arrival of the first frame
published after it) and the frames lost (sequence numbers never received).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Dict, List

from socketengine import frames
from socketengine.transport.nats.cluster import LocalCluster
from socketengine.transport.nats.link import NatsLink
from socketengine.transport.nats.wire import decode_one


def run_once(cluster: LocalCluster, scenario: str, period: float) -> Dict[str, float]:
    a, b = cluster.nodes[0], cluster.nodes[1]
    pub_node, sub_node = (a, b) if scenario == "sub" else (b, a)
    received: List[tuple] = []
    lock = threading.Lock()

    def on_frame(subject: str, body: bytes) -> None:
        seq = decode_one(body).value()
        with lock:
            received.append((time.monotonic(), seq))

    sub = NatsLink()
    sub.connect(sub_node.url, name="sub", reconnect_wait=0.1)
    sub.subscribe("se.failover", on_frame)
    sub.flush()
    pub = NatsLink()
    pub.connect(pub_node.url, name="pub", reconnect_wait=0.1)
    seq = 0
    seq_at_kill = 0
    stop_at = None
    killed_at = 0.0
    # Wait until frames flow, publish 1 s, kill node B, publish 4 s more.
    start = time.monotonic()
    while True:
        now = time.monotonic()
        if stop_at is None and received and now - start > 1.0:
            cluster.kill(1)
            killed_at = time.monotonic()
            seq_at_kill = seq
            stop_at = killed_at + 4.0
        if stop_at is not None and now > stop_at:
            break
        try:
            pub.publish("se.failover", frames.encode_value_frame(frames.DATA, "seq", seq))
            seq += 1
        except Exception as exc:  # the publisher's node died: count it, keep going
            print("publish failed:", exc, file=sys.stderr)
        time.sleep(period)  # the publishing rate of this benchmark
    pub.flush(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with lock:
            if received and received[-1][1] == seq - 1:
                break
        time.sleep(0.05)
    pub.close()
    sub.close()
    cluster.restart(1)
    with lock:
        got = {s for _, s in received}
        after = [t for t, s in received if s >= seq_at_kill]
    first_seq = min(got)
    lost = len(set(range(first_seq, seq)) - got)
    gap = (after[0] - killed_at) if after else float("inf")
    return {"gap": gap, "lost": lost, "sent": seq - first_seq}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--period", type=float, default=0.001)
    args = parser.parse_args()
    with LocalCluster(3) as cluster:
        for scenario in ("sub", "pub"):
            results = [run_once(cluster, scenario, args.period) for _ in range(args.runs)]
            gaps = [r["gap"] for r in results]
            lost = [r["lost"] for r in results]
            sent = [r["sent"] for r in results]
            print(
                f"{scenario}: node B killed; gap median {statistics.median(gaps):.3f} s "
                f"(min {min(gaps):.3f}, max {max(gaps):.3f}); frames lost median "
                f"{statistics.median(lost)} (min {min(lost)}, max {max(lost)}) of "
                f"~{int(statistics.median(sent))} sent"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
