"""Retained values in JetStream KV / object store, on a real 3-node cluster."""

from __future__ import annotations

import os
import time
from typing import Any, Iterator

import pytest
from nats_fixtures import *  # noqa: F403
from nats_fixtures import LocalCluster

from socketengine import frames
from socketengine.transport.nats.retained import POINTER, RetainedStore
from socketengine.transport.nats.wire import decode_one, frame_bytes


def frame(channel: str, value: Any) -> bytes:
    return frame_bytes(frames.encode_value_frame(frames.DATA, channel, value))


@pytest.fixture
def host_name() -> Iterator[str]:
    yield f"host {os.urandom(4).hex()}.*"  # awkward on purpose: dots, space, wildcard


def test_put_get_delete_list(nats_cluster: LocalCluster, make_link: Any, host_name: str) -> None:
    link = make_link(nats_cluster.urls)
    store = RetainedStore(link, host_name)
    try:
        assert store.channels() == [] and store.get("a") is None
        store.put("a.b", frame("a.b", 1))
        store.put("* >", frame("* >", "x"))
        big = frame("image", b"\x01" * 3_000_000)  # beyond max_payload: split over keys
        store.put("image", big)
        assert store.channels() == ["* >", "a.b", "image"]
        assert decode_one(store.get("a.b")).value() == 1
        assert store.get("image") == big
        # The key holds a manifest for the big one, the pieces are keys "image.0"...
        raw = link.run(store.aio._raw("image"))
        assert raw.startswith(POINTER)
        assert link.run(store.aio._raw("image.2")) is not None
        # Overwriting with a small value removes the pieces.
        store.put("image", frame("image", b"small"))
        assert decode_one(store.get("image")).value() == b"small"
        assert link.run(store.aio._raw("image.0")) is None
        # A fresh store (another process) also finds and removes old pieces.
        store.put("image", big)
        other = RetainedStore(link, host_name)
        other.delete("image")
        assert link.run(store.aio._raw("image.1")) is None and store.get("image") is None
        store.put("image", frame("image", b"small"))
        store.delete("a.b")
        store.delete("never-set")
        assert store.get("a.b") is None
        assert set(store.items()) == {"* >", "image"}
    finally:
        store.destroy()


def test_retained_value_survives_killing_the_node_that_took_it(
    nats_cluster: LocalCluster, make_link: Any, host_name: str
) -> None:
    writer = make_link(nats_cluster.nodes[1].url)
    store = RetainedStore(writer, host_name)
    big = frame("image", bytes(range(256)) * 8000)  # 2 MB: split over keys
    store.put("status", frame("status", {"ok": True}))
    store.put("image", big)
    writer.close()
    nats_cluster.kill(1)  # the node the writer was connected to
    t0 = time.monotonic()
    late = make_link(nats_cluster.nodes[2].url)
    again = RetainedStore(late, host_name, timeout=20.0)
    assert decode_one(again.get("status")).value() == {"ok": True}
    assert again.get("image") == big
    assert again.channels() == ["image", "status"]
    print(f"retained values read {time.monotonic() - t0:.2f} s after the kill")
    # (the bucket goes with the session cluster: deleting it needs a stream leader)


def test_retry_transient_retries_only_what_jetstream_may_answer_later() -> None:
    import asyncio

    import nats.errors as nerr

    from socketengine.transport.nats.retained import retry_transient

    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise nerr.NoRespondersError  # a stream electing its leader
        return "ok"

    async def broken() -> str:
        calls.append(1)
        raise ValueError("not JetStream's fault")

    async def never() -> str:
        raise nerr.NoRespondersError

    assert asyncio.run(retry_transient(flaky, 5.0)) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ValueError):
        asyncio.run(retry_transient(broken, 5.0))
    assert len(calls) == 1  # not retried
    with pytest.raises(nerr.NoRespondersError):  # the deadline passed: the last error
        asyncio.run(retry_transient(never, 0.25))


def _placement_refusal(description: str) -> BaseException:
    """The error nats-py raises for the server's answer (as seen from nats-server 2.x when
    the meta leader still counted a just-restarted server offline)."""
    from nats.js.errors import APIError

    try:
        APIError.from_error({"code": 400, "err_code": 10005, "description": description})
    except APIError as exc:
        return exc
    raise AssertionError("from_error always raises")


def test_bucket_creation_waits_while_jetstream_counts_a_server_offline(
    nats_cluster: LocalCluster, make_link: Any, host_name: str
) -> None:
    """Creating a bucket right after a server restarted can be refused with "no suitable
    peers for placement, peer offline" (seen once in CI) until the meta leader hears from
    it; that refusal is retried, any other is raised at once.  The refusal cannot be
    produced on demand, so the real JetStream context is wrapped to answer it first."""
    import nats.js.errors as jerr

    from socketengine.transport.nats.retained import create_bucket_kv, placement_pending

    link = make_link(nats_cluster.urls)
    offline = _placement_refusal("no suitable peers for placement, peer offline")
    no_room = _placement_refusal("no suitable peers for placement, insufficient resources")
    assert placement_pending(offline) and not placement_pending(no_room)
    assert not placement_pending(jerr.BadRequestError(code=400, err_code=10074))

    class RefusingFirst:
        """The link's JetStream context (made on the link's loop: nats-py's needs one on
        Python 3.9), answering ``error`` to the first ``times`` creations."""

        def __init__(self, error: BaseException, times: int) -> None:
            self.error, self.times, self.calls = error, times, 0

        async def create_key_value(self, config: Any) -> Any:
            self.calls += 1
            if self.calls <= self.times:
                raise self.error
            return await link.aio.nc.jetstream().create_key_value(config)

    bucket = f"placement-{os.urandom(4).hex()}"
    js = RefusingFirst(offline, times=3)
    kv = link.run(create_bucket_kv(js, 3, 10.0, bucket=bucket, history=1))
    assert js.calls == 4
    link.run(kv.put("k", b"v"))
    assert link.run(kv.get("k")).value == b"v"
    # Another refusal is not retried; an offline peer that stays offline is raised
    # once the wait is over.
    js = RefusingFirst(no_room, times=1)
    with pytest.raises(jerr.BadRequestError, match="insufficient"):
        link.run(create_bucket_kv(js, 3, 10.0, bucket=bucket, history=1))
    assert js.calls == 1
    js = RefusingFirst(offline, times=10**6)
    t0 = time.monotonic()
    with pytest.raises(jerr.BadRequestError, match="offline"):
        link.run(create_bucket_kv(js, 3, 0.5, bucket=bucket, history=1))
    assert js.calls >= 2 and time.monotonic() - t0 < 5.0

    async def delete() -> None:
        await link.aio.nc.jetstream().delete_key_value(bucket)

    link.run(delete())
