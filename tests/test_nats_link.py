"""NatsLink against a real 3-node NATS cluster."""

from __future__ import annotations

import queue
import socket
import time
from typing import Any, List, Tuple

import pytest
from nats_cluster import start_cluster
from nats_fixtures import *  # noqa: F403
from nats_fixtures import LocalCluster

from socketengine import frames
from socketengine.errors import AuthenticationError, ConnectTimeout, EndpointClosed
from socketengine.transport.nats.link import AsyncNatsLink, NatsLink
from socketengine.transport.nats.subjects import Subjects
from socketengine.transport.nats.wire import decode_one, frame_bytes

S = Subjects("se.test")


PROBE = frame_bytes(frames.encode_frame(frames.PING))


def collector() -> Tuple[queue.Queue[Tuple[str, Any]], Any]:
    """A queue and a callback filling it, skipping the probes of :func:`wait_interest`."""
    q: queue.Queue[Tuple[str, Any]] = queue.Queue()

    def cb(subject: str, body: Any) -> None:
        if body != PROBE:
            q.put((subject, body))
        else:
            probes.put(subject)

    probes: queue.Queue[str] = queue.Queue()
    cb.probes = probes  # type: ignore[attr-defined]
    return q, cb


def wait_interest(pub: NatsLink, subject: str, cb: Any) -> None:
    """Publish probes until ``cb`` receives one: the subscriber's interest crossed the
    routes to the publisher's node (NATS propagates it asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        pub.publish(subject, PROBE)
        try:
            cb.probes.get(timeout=0.05)
            return
        except queue.Empty:
            assert time.monotonic() < deadline, "subscription interest never propagated"


def test_publish_subscribe_across_nodes(nats_cluster: LocalCluster, make_link: Any) -> None:
    a, b, c = (make_link(n.url, name=f"link-{n.name}") for n in nats_cluster.nodes)
    qb, cb_b = collector()
    qc, cb_c = collector()
    subject = S.broadcast("host 1", "chan.*>")
    b.subscribe(subject, cb_b)
    c.subscribe(S.broadcast_all("host 1"), cb_c)
    b.flush()
    c.flush()
    wait_interest(a, subject, cb_b)
    wait_interest(a, subject, cb_c)
    for i in range(200):
        a.publish(subject, frames.encode_value_frame(frames.DATA, "chan.*>", i))
    got_b = [decode_one(qb.get(timeout=10)[1]).value() for _ in range(200)]
    got_c = [qc.get(timeout=10) for _ in range(200)]
    assert got_b == list(range(200))
    assert [decode_one(body).value() for _, body in got_c] == list(range(200))
    assert {s for s, _ in got_c} == {subject}
    assert S.parse(got_c[0][0]).name == "chan.*>"
    assert a.losses == b.losses == c.losses == 0


def test_6mb_frame_is_chunked_across_nodes(nats_cluster: LocalCluster, make_link: Any) -> None:
    np = pytest.importorskip("numpy")
    a = make_link(nats_cluster.nodes[0].url)
    c = make_link(nats_cluster.nodes[2].url)
    assert a.max_payload == 1024 * 1024
    q, cb = collector()
    subject = S.client_inbox("h", "cam")
    c.subscribe(subject, cb)
    c.flush()
    wait_interest(a, subject, cb)
    img = np.random.default_rng(1).integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    for k in range(3):
        img[0, 0, 0] = k
        parts = frames.encode_value_frame(frames.DATA, "image", img, flags=frames.FLAG_IMAGE)
        assert frames.frame_size(parts) > 6_000_000
        a.publish(subject, parts)
    for k in range(3):
        body = q.get(timeout=20)[1]
        assert isinstance(body, bytearray)
        f = decode_one(body)
        out = f.value()
        assert f.flags == frames.FLAG_IMAGE and out.flags.writeable
        assert out[0, 0, 0] == k and np.array_equal(out[1:], img[1:])
    assert a.losses == c.losses == 0


def test_request_reply(nats_cluster: LocalCluster, make_link: Any) -> None:
    a = make_link(nats_cluster.nodes[0].url)
    b = make_link(nats_cluster.nodes[1].url)
    b.serve("se.test.echo", lambda body: body[::-1])
    b.flush()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert a.request("se.test.echo", b"abc", timeout=1) == b"cba"
            break
        except Exception:
            if time.monotonic() > deadline:
                raise


def test_unreachable_raises_connect_timeout() -> None:
    with socket.socket() as s:  # an OS-chosen port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    link = NatsLink()
    t = time.monotonic()
    with pytest.raises(ConnectTimeout, match=f"127.0.0.1:{port}"):
        link.connect([f"nats://127.0.0.1:{port}"], connect_timeout=1.0)
    assert time.monotonic() - t < 5
    with pytest.raises(EndpointClosed):
        link.publish("x", b"y")
    link.close()


@pytest.fixture(scope="module")
def token_cluster() -> Any:
    cluster = start_cluster(3, token="s3cret")
    yield cluster
    cluster.stop()


def test_wrong_token_raises_authentication_error(token_cluster: LocalCluster) -> None:
    for token in ("wrong", None):
        link = NatsLink()
        with pytest.raises(AuthenticationError, match="refused the credentials"):
            link.connect(token_cluster.urls, token=token, connect_timeout=5.0)
        link.close()
    ok = NatsLink()
    ok.connect(token_cluster.urls, token="s3cret", connect_timeout=5.0)
    assert ok.connected
    ok.close()


def test_async_link_in_an_asyncio_program(nats_cluster: LocalCluster) -> None:
    import asyncio

    async def main() -> List[Any]:
        a, b = AsyncNatsLink(), AsyncNatsLink()
        await a.connect(nats_cluster.nodes[0].url)
        await b.connect(nats_cluster.nodes[1].url)
        got: asyncio.Queue = asyncio.Queue()
        sub = await b.subscribe("se.test.aio", lambda s, body: got.put_nowait(body))
        await b.flush()
        out = []
        while not out:
            await a.publish("se.test.aio", b"x" * 3_000_000)
            try:
                out.append(await asyncio.wait_for(got.get(), 0.2))
            except asyncio.TimeoutError:
                pass
        await sub.unsubscribe()
        await a.close()
        await b.close()
        return out

    (body,) = asyncio.run(main())
    assert bytes(body) == b"x" * 3_000_000


def test_callbacks_may_publish(nats_cluster: LocalCluster, make_link: Any) -> None:
    a = make_link(nats_cluster.nodes[0].url)
    q, cb = collector()
    a.subscribe("se.test.pong", cb)

    def ping(subject: str, body: Any) -> None:
        a.publish("se.test.pong", body)  # on the link thread: must not deadlock

    a.subscribe("se.test.ping", ping)
    a.flush()
    a.publish("se.test.ping", b"hello")
    assert q.get(timeout=10)[1] == b"hello"
    with pytest.raises(RuntimeError, match="own thread"):
        done: queue.Queue[BaseException] = queue.Queue()

        def blocking(subject: str, body: Any) -> None:
            try:
                a.flush()  # a blocking call on the link thread is refused, not a deadlock
            except BaseException as exc:
                done.put(exc)

        a.subscribe("se.test.block", blocking)
        a.publish("se.test.block", b"x")
        raise done.get(timeout=10)


def test_subscriber_resumes_after_its_node_dies(nats_cluster: LocalCluster, make_link: Any) -> None:
    states: queue.Queue[str] = queue.Queue()
    q, cb = collector()
    sub = make_link(
        nats_cluster.nodes[1].url, link_kwargs={"on_state": states.put}, reconnect_wait=0.1
    )
    sub.subscribe("se.test.failover", cb)
    sub.flush()
    pub = make_link(nats_cluster.nodes[0].url)
    wait_interest(pub, "se.test.failover", cb)
    pub.publish("se.test.failover", frames.encode_value_frame(frames.DATA, "n", -1))
    assert decode_one(q.get(timeout=10)[1]).value() == -1
    nats_cluster.kill(1)
    assert states.get(timeout=10) == "disconnected"
    assert states.get(timeout=10) == "reconnected"
    assert sub.connected_url != nats_cluster.nodes[1].url
    # The subscription was re-made on the new server: frames flow again.
    wait_interest(pub, "se.test.failover", cb)
    pub.publish("se.test.failover", frames.encode_value_frame(frames.DATA, "n", 1))
    assert decode_one(q.get(timeout=10)[1]).value() == 1


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: Any) -> Any:
    from certs import self_signed

    cert, key = self_signed(tmp_path_factory.mktemp("nats-tls"), "localhost")
    cluster = start_cluster(3, user="cam", password="pw", tls_cert=str(cert), tls_key=str(key))
    cluster.ca = str(cert)  # type: ignore[attr-defined]
    yield cluster
    cluster.stop()


def test_tls_and_user_password(tls_cluster: LocalCluster, make_link: Any) -> None:
    import ssl

    from socketengine.errors import HandshakeError

    ctx = ssl.create_default_context(cafile=tls_cluster.ca)  # type: ignore[attr-defined]
    a = make_link(tls_cluster.nodes[0].url, user="cam", password="pw", tls=ctx)
    b = make_link(tls_cluster.nodes[2].url, user="cam", password="pw", tls=ctx)
    q, cb = collector()
    b.subscribe("se.test.tls", cb)
    b.flush()
    wait_interest(a, "se.test.tls", cb)
    a.publish("se.test.tls", frames.encode_value_frame(frames.DATA, "c", b"x" * 2_000_000))
    assert decode_one(q.get(timeout=10)[1]).value() == b"x" * 2_000_000
    link = NatsLink()
    with pytest.raises(AuthenticationError):
        link.connect(tls_cluster.urls, user="cam", password="wrong", tls=ctx)
    # Without tls= nats-py still speaks TLS to a server that requires it, with the
    # system's CAs: the self-signed certificate does not verify.
    with pytest.raises(HandshakeError, match="did not verify"):
        link.connect(tls_cluster.urls, user="cam", password="pw")
    with pytest.raises(HandshakeError, match="did not verify"):
        link.connect(tls_cluster.urls, user="cam", password="pw", tls=ssl.create_default_context())
    link.close()


def test_incomplete_chunked_message_is_reported_lost(
    nats_cluster: LocalCluster, make_link: Any
) -> None:
    from socketengine.transport.nats.chunks import Chunker

    losses: queue.Queue[Any] = queue.Queue()
    sub = make_link(
        nats_cluster.nodes[1].url, link_kwargs={"on_loss": losses.put, "chunk_timeout": 0.5}
    )
    pub = make_link(nats_cluster.nodes[0].url)
    q, cb = collector()
    s = sub.subscribe("se.test.loss", cb)
    sub.flush()
    wait_interest(pub, "se.test.loss", cb)
    chunks = Chunker(100_000, sender=77).split(b"\x10" * 350_000)
    for m in chunks[:2]:  # the rest never comes: the sender died mid-message
        pub.publish("se.test.loss", m)
    loss = losses.get(timeout=10)
    assert (loss.sender, loss.received, loss.chunks) == (77, 2, 4)
    assert "timeout" in loss.reason and sub.losses == 1
    # Whole frames still flow; after unsubscribe nothing arrives.
    pub.publish("se.test.loss", frames.encode_value_frame(frames.DATA, "c", 5))
    assert decode_one(q.get(timeout=10)[1]).value() == 5
    s.unsubscribe()
    sub.flush()
    pub.publish("se.test.loss", frames.encode_value_frame(frames.DATA, "c", 6))
    pub.flush()
    sub.flush()  # a round trip through the subscriber's server after the publish
    assert q.empty()


def test_publish_nowait_keeps_order_and_flush_waits(
    nats_cluster: LocalCluster, make_link: Any
) -> None:
    pub = make_link(nats_cluster.nodes[0].url)
    sub = make_link(nats_cluster.nodes[2].url)
    q, cb = collector()
    sub.subscribe("se.test.nowait", cb)
    sub.flush()
    wait_interest(pub, "se.test.nowait", cb)
    sent = []
    for i in range(1000):
        value: Any = b"\x07" * 1_500_000 if i in (10, 500) else i  # two chunked ones
        sent.append(value)
        if i % 3:
            pub.publish_nowait("se.test.nowait", frames.encode_value_frame(frames.DATA, "c", value))
        else:
            pub.publish("se.test.nowait", frames.encode_value_frame(frames.DATA, "c", value))
    pub.flush()
    assert pub._queued == 0 and pub.send_failures == 0
    got = [decode_one(q.get(timeout=10)[1]).value() for _ in range(1000)]
    assert got == sent


def test_publish_nowait_blocks_then_times_out_when_the_queue_is_full(
    nats_cluster: LocalCluster, make_link: Any
) -> None:
    import threading

    from socketengine.errors import WriteTimeout

    link = make_link(nats_cluster.nodes[0].url, link_kwargs={"max_queue": 1000})
    release = threading.Event()
    stalled = threading.Event()

    def stall(subject: str, body: Any) -> None:
        stalled.set()
        release.wait(10)  # holds the link thread: queued frames cannot be handed over

    link.subscribe("se.test.stall", stall)
    link.flush()
    link.publish("se.test.stall", b"x")
    assert stalled.wait(10)
    try:
        link.publish_nowait("se.test.other", b"y" * 800)  # fits in the queue
        with pytest.raises(WriteTimeout, match="queued"):
            link.publish_nowait("se.test.other", b"z" * 800, timeout=0.2)
    finally:
        release.set()
    link.publish_nowait("se.test.other", b"z" * 800, timeout=10)  # room again
    link.flush()
    assert link._queued == 0
