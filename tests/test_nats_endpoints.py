"""Host/Client over NATS: the same behaviour as direct TCP, on a real 3-node cluster.

Scenarios parametrized over ``net`` run over direct TCP, over NATS (host on node A,
clients on nodes B and C) and over NATS with the asyncio layer (its endpoints driven by
blocking calls from the test, see :class:`Blocking`); those over ``sync_net`` run with
the threaded layer only (direct TCP and NATS); the rest are NATS-only (failover of a
node, JetStream retained values, authentication, subject safety).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest
from conftest import wait_for
from nats_fixtures import *  # noqa: F403
from test_parity import AioThread

from socketengine import AuthenticationError, Client, ConnectTimeout, Host, RemoteError, aio

NETS = ["tcp", "nats"]


class Blocking:
    """An asyncio endpoint, connection or subscription used with blocking calls: each
    call runs on the runner's loop (awaited there when it returns an awaitable), and
    asyncio objects in the result come back wrapped, the same wrapper for the same
    object (so ``is`` works).  ``sub.get(timeout=)`` waits as the threaded one does."""

    def __init__(self, obj: Any, runner: AioThread, cache: Dict[int, Any]) -> None:
        self.__dict__.update(_obj=obj, _runner=runner, _cache=cache)

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(self._wrap(v) for v in value)
        if type(value).__module__.startswith("socketengine.aio"):
            wrapped = self._cache.get(id(value))
            if wrapped is None or wrapped._obj is not value:
                wrapped = self._cache[id(value)] = Blocking(value, self._runner, self._cache)
            return wrapped
        return value

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if not callable(attr):
            return self._wrap(attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            async def invoke() -> Any:
                if name == "get" and isinstance(self._obj, aio.Subscription):
                    try:
                        return await asyncio.wait_for(attr(), kwargs.get("timeout"))
                    except asyncio.TimeoutError:
                        raise TimeoutError("nothing arrived") from None
                result = attr(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            return self._wrap(self._runner.run(invoke(), 60.0))

        return call


class Net:
    """Makes hosts and clients over one transport and layer; closes them after the test."""

    def __init__(self, kind: str, cluster: Any, runner: Optional[AioThread] = None) -> None:
        self.kind = kind
        self.cluster = cluster
        self.runner = runner  # the asyncio layer's loop (None: threaded layer)
        self.made: List[Any] = []
        self._cache: Dict[int, Any] = {}

    def _start(self, endpoint: Any) -> Any:
        assert self.runner is not None
        started = self.runner.run(endpoint.start(), 60.0)
        return Blocking(started, self.runner, self._cache)

    def host(self, **kwargs: Any) -> Host:
        if self.kind == "tcp":
            h = Host(port=0, **kwargs)
        else:
            kwargs.setdefault("name", f"h-{uuid.uuid4().hex[:10]}")
            if self.runner is not None:
                h = self._start(aio.Host(url=self.cluster.urls[0], **kwargs))
            else:
                h = Host(url=self.cluster.urls[0], **kwargs)
        self.made.append(h)
        return h

    def client(self, host: Host, node: int = 1, **kwargs: Any) -> Client:
        kwargs.setdefault("connect_timeout", 10)
        if self.kind == "tcp":
            c = Client(port=host.port, **kwargs)
        elif self.runner is not None:
            c = self._start(aio.Client(url=self.cluster.urls[node], host=host.name, **kwargs))
        else:
            c = Client(url=self.cluster.urls[node], host=host.name, **kwargs)
        self.made.append(c)
        return c

    def close(self) -> None:
        for ep in reversed(self.made):
            ep.close()
        if self.runner is not None:
            self.runner.close()


@pytest.fixture(params=NETS + ["nats-aio"])
def net(request: Any) -> Iterator[Net]:
    """Direct TCP, NATS, and NATS with the asyncio layer."""
    kind = request.param.split("-")[0]
    cluster = request.getfixturevalue("nats_cluster") if kind == "nats" else None
    n = Net(kind, cluster, AioThread() if request.param.endswith("-aio") else None)
    yield n
    n.close()


@pytest.fixture(params=NETS)
def sync_net(request: Any) -> Iterator[Net]:
    """Direct TCP and NATS, threaded layer (scenarios that block an I/O thread)."""
    cluster = request.getfixturevalue("nats_cluster") if request.param == "nats" else None
    n = Net(request.param, cluster)
    yield n
    n.close()


@pytest.fixture
def nats_net(nats_cluster: Any) -> Iterator[Net]:
    n = Net("nats", nats_cluster)
    yield n
    n.close()


def _connected(host: Host, count: int) -> None:
    wait_for(lambda: len(host.clients()) == count, timeout=10, what=f"{count} clients")


# -- the same behaviour over both transports --------------------------------------------------


def test_values_both_ways(net: Net) -> None:
    h = net.host()
    c1 = net.client(h, 1, name="cam-1")
    c2 = net.client(h, 2, name="cam-2")
    _connected(h, 2)
    c1.write("x", 1)
    c2.write("x", {"k": [2, "two"]})
    wait_for(lambda: len(h.get_all("x")) == 2, what="one value per client")
    assert sorted(map(repr, h.get_all("x"))) == sorted(map(repr, [1, {"k": [2, "two"]}]))
    assert h.get("x") in (1, {"k": [2, "two"]})
    assert h.write_all("cfg", "all") == 2
    wait_for(lambda: c1.get("cfg") == "all" and c2.get("cfg") == "all", what="write_all")
    conn = h.get_client("cam-2")
    assert conn is not None and conn.name == "cam-2"
    conn.write("only", 7)
    wait_for(lambda: c2.get("only") == 7, what="conn.write")
    c1.write("sync", 1, ack=True)  # SYNC/ACK through the transport
    assert h.get_client("cam-1").get("sync") == 1
    assert c1.get("only") is None
    assert sorted(c.name for c in h.clients()) == ["cam-1", "cam-2"]


def test_arrays_and_images(net: Net) -> None:
    np = pytest.importorskip("numpy")
    h = net.host()
    c = net.client(h, 2)
    _connected(h, 1)
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    c.write("arr", arr)
    wait_for(lambda: h.get("arr") is not None, what="the array")
    assert h.get("arr").tolist() == arr.tolist()
    img = np.zeros((48, 64, 3), np.uint8)
    img[10, 20] = (1, 2, 3)
    h.write_image_all(img, "image")
    wait_for(lambda: c.get("image") is not None, what="a raw image")
    assert (c.get("image") == img).all()
    try:
        h.write_image_all(img, "png", codec="png")
    except Exception as exc:  # noqa: BLE001 (no PNG codec installed)
        pytest.skip(f"no PNG codec: {exc}")
    wait_for(lambda: c.get("png") is not None, what="a PNG image")
    assert (c.get("png") == img).all()
    assert c.get_jpeg("png")[:4] == b"\x89PNG"


def test_large_values_cross_max_payload(net: Net) -> None:
    h = net.host()
    c = net.client(h, 2)
    _connected(h, 1)
    big = os.urandom(3 * 1024 * 1024)  # 3 MB: three times NATS's 1 MiB max_payload
    c.write("big", big)
    wait_for(lambda: h.get("big") is not None, timeout=10, what="3 MB up")
    assert h.get("big") == big
    h.write_all("big", big[::-1])
    wait_for(lambda: c.get("big") is not None, timeout=10, what="3 MB down")
    assert c.get("big") == big[::-1]


def test_callbacks_wait_and_subscriptions_in_order(net: Net) -> None:
    h = net.host()
    c = net.client(h, 1)
    _connected(h, 1)
    seen: List[Any] = []
    c.on("n", seen.append)
    sub = c.subscribe("n")
    host_sub = h.subscribe("up")
    for i in range(200):
        h.write_all("n", i)
    for i in range(50):
        c.write("up", i)
    got = [sub.get(timeout=10) for _ in range(200)]
    assert got == list(range(200))
    assert [host_sub.get(timeout=10)[0] for _ in range(50)] == list(range(50))
    wait_for(lambda: len(seen) == 200, what="every callback")
    assert seen == list(range(200))
    c.off("n")
    h.write_all("n", "after")
    assert sub.get(timeout=10) == "after"
    assert len(seen) == 200
    # wait() sees only values after the call: keep writing until it returns.
    stop = threading.Event()

    def writer() -> None:
        for _ in range(400):  # bounded: 20 s
            if stop.wait(0.05):
                return
            c.write("w", 2)

    t = threading.Thread(target=writer)
    t.start()
    try:
        value, conn = h.wait("w", 10)
    finally:
        stop.set()
        t.join(10)
    assert value == 2 and conn is h.clients()[0]


def test_write_many_both_ways(net: Net) -> None:
    h = net.host()
    c = net.client(h, 1, name="cam-1")
    _connected(h, 1)
    host_sub = h.subscribe("n")
    sub = c.subscribe("m")
    c.write_many([("n", i) for i in range(300)] + [("last", {"k": 1})])
    c.write_many({"a": 1, "b": "two"})
    assert [host_sub.get(timeout=10)[0] for _ in range(300)] == list(range(300))
    wait_for(lambda: h.get("b") == "two", what="the mapping")
    assert (h.get("last"), h.get("a")) == ({"k": 1}, 1)
    conn = h.get_client("cam-1")
    conn.write_many([("m", i) for i in range(100)])
    assert [sub.get(timeout=10) for _ in range(100)] == list(range(100))


def test_requests_both_ways(net: Net) -> None:
    h = net.host()
    c = net.client(h, 2, name="asker")
    _connected(h, 1)
    h.on("double", lambda v, conn: v * 2)
    h.on("boom", lambda v, conn: 1 / 0)
    c.on("who", lambda v: f"asker got {v}")
    assert c.request("double", 21, timeout=10) == 42
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        c.request("boom", 1, timeout=10)
    with pytest.raises(RemoteError, match="no handler"):
        c.request("nobody", 1, timeout=10)
    assert h.get_client("asker").request("who", 5, timeout=10) == "asker got 5"


def test_presence_and_hooks(net: Net) -> None:
    h = net.host()
    joined: List[str] = []
    left: List[str] = []
    h.on_connect(lambda conn: joined.append(conn.name))
    h.on_disconnect(lambda conn: left.append(conn.name))
    c1 = net.client(h, 1, name="a")
    net.client(h, 2, name="b")
    _connected(h, 2)
    wait_for(lambda: sorted(joined) == ["a", "b"], what="on_connect")
    assert h.get_client("a") is not None and h.get_client("zzz") is None
    c1.write("v", 1)
    c1.close()
    wait_for(lambda: left == ["a"], timeout=10, what="on_disconnect")
    assert [c.name for c in h.clients()] == ["b"]
    assert h.get_all("v") == [1]  # a departed client's value is still reported


def test_retained_values_reach_late_joiners(net: Net) -> None:
    h = net.host()
    h.write_all("cfg", {"mode": 3}, retain=True)
    late = net.client(h, 2)
    wait_for(lambda: late.get("cfg") == {"mode": 3}, timeout=10, what="the retained value")
    h.clear_retained("cfg")
    later = net.client(h, 1)
    later.write("ping", 1)
    wait_for(lambda: h.get_all("ping"), what="the later client")
    assert later.get("cfg") is None


def test_write_all_follows_interest_set_later(net: Net) -> None:
    """A fanned-out write_all is one publish only while no client filters channels;
    an interest set (or cleared) on a live connection is honoured at once."""
    h = net.host()
    picky = net.client(h, 1, name="picky")
    other = net.client(h, 2, name="other")
    _connected(h, 2)
    assert h.write_all("x", 1) == 2
    wait_for(lambda: picky.get("x") == 1 and other.get("x") == 1, what="both")
    picky.set_interest(["mark"])
    wait_for(lambda: h.get_client("picky").interest is not None, what="the interest")
    assert h.write_all("x", 2) == 1  # sent to the clients that want it
    assert h.write_all("mark", 1) == 2
    wait_for(lambda: picky.get("mark") == 1 and other.get("x") == 2, what="the marker")
    assert picky.get("x") == 1  # filtered by the host
    picky.set_interest(None)
    wait_for(lambda: h.get_client("picky").interest is None, what="the interest cleared")
    h.write_all("x", 3)
    wait_for(lambda: picky.get("x") == 3, what="all channels again")


def test_wildcard_looking_channel_names_reach_only_their_channel(net: Net) -> None:
    h = net.host()
    c = net.client(h, 1)
    _connected(h, 1)
    names = ["*", ">", "a.b", "a.*", "a b", "é", "", "se.h.x.b.*"]
    for i, name in enumerate(names):
        h.write_all(name, i)
    h.write_all("end", True)
    wait_for(lambda: c.get("end"), what="the last write")
    for i, name in enumerate(names):
        assert c.get(name) == i, name
    assert c.get("a") is None and c.get("b") is None


# -- NATS only ---------------------------------------------------------------------------------


def test_host_names_are_isolated(nats_net: Net) -> None:
    hosts = [nats_net.host(name=n) for n in (f"r{uuid.uuid4().hex[:6]}.*", "robot.>")]
    clients = [nats_net.client(h, 1) for h in hosts]
    for h in hosts:
        _connected(h, 1)
    hosts[0].write_all("who", 0)
    hosts[1].write_all("who", 1)
    wait_for(lambda: [c.get("who") for c in clients] == [0, 1], what="each host's value")
    clients[0].write("up", "x")
    wait_for(lambda: hosts[0].get("up") == "x", what="the value up")
    assert hosts[1].get("up") is None


def test_no_server_is_a_clear_error_within_connect_timeout() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(ConnectTimeout, match="nats://127.0.0.1"):
        Client(url=f"nats://127.0.0.1:{port}", host="h", connect_timeout=1.0)
    with pytest.raises(ConnectTimeout):
        Host(url=f"nats://127.0.0.1:{port}", name="h", connect_timeout=1.0)
    assert time.monotonic() - t0 < 2 * 1.0 + 3.0


def test_bad_arguments_are_refused_before_connecting() -> None:
    with pytest.raises(TypeError, match="name"):
        Host(url="nats://127.0.0.1:1")
    with pytest.raises(TypeError, match="host"):
        Client(url="nats://127.0.0.1:1")
    with pytest.raises(ValueError, match="nats://"):
        Client(url="http://127.0.0.1:1", host="h")


@pytest.fixture(scope="module")
def token_node() -> Iterator[Any]:
    from nats_cluster import start_cluster

    cluster = start_cluster(3, token="s3cret")  # JetStream wants a meta leader: 3 nodes
    yield cluster
    cluster.stop()


def test_token_maps_onto_nats_auth(token_node: Any) -> None:
    url = token_node.urls[0]
    with pytest.raises(AuthenticationError):
        Host(url=url, name="t", token="wrong", connect_timeout=5)
    with pytest.raises(AuthenticationError):
        Client(url=url, host="t", connect_timeout=5)
    with Host(url=url, name="t", token="s3cret") as h:
        with Client(url=url, host="t", token="s3cret", connect_timeout=10) as c:
            c.write("x", 1)
            wait_for(lambda: h.get("x") == 1, what="the value")


_KILLED_CLIENT = textwrap.dedent(
    """
    import sys, time
    from socketengine import Client
    if sys.argv[1].isdigit():  # direct TCP: the host's port
        c = Client(port=int(sys.argv[1]), name="doomed", heartbeat=0.5, connect_timeout=10)
    else:
        c = Client(url=sys.argv[1], host=sys.argv[2], name="doomed", heartbeat=0.5,
                   connect_timeout=10)
    c.write("alive", 1)
    print("ready", flush=True)
    time.sleep(60)  # killed long before
    """
)


@contextlib.contextmanager
def _doomed_client(where: str, host: str) -> Iterator[subprocess.Popen]:
    """A client process (named "doomed") of ``host`` at ``where`` (a NATS URL, or the
    host's TCP port), ready once it wrote "alive"; killed at the end if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, where, host], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_a_killed_client_is_reported_gone_within_the_heartbeat_bound(nats_net: Net) -> None:
    h = nats_net.host(heartbeat=0.5)
    left: List[float] = []
    h.on_disconnect(lambda conn: left.append(time.monotonic()))
    with _doomed_client(nats_net.cluster.urls[2], h.name) as proc:
        wait_for(lambda: h.get_client("doomed"), timeout=10, what="the client")
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # 3 heartbeats of silence, plus the host's tick (H/2) and some slack.
        wait_for(lambda: left, timeout=3 * 0.5 + 0.25 + 2.0, what="on_disconnect")
        assert left[0] - killed <= 3 * 0.5 + 0.25 + 2.0
        assert h.get_client("doomed") is None


def test_retained_values_survive_the_node_that_took_them(nats_net: Net) -> None:
    cluster = nats_net.cluster
    name = f"keep-{uuid.uuid4().hex[:8]}"
    h = Host(url=cluster.urls[0], name=name)
    try:
        h.write_all("cfg", {"v": 1}, retain=True)
        cluster.kill(0)  # the node the host (and its retained write) went through
        late = nats_net.client(h, 2)  # the host's link fails over to B or C
        wait_for(lambda: late.get("cfg") == {"v": 1}, timeout=15, what="the value via B/C")
    finally:
        h.close()
    # A new host of the same name, elsewhere, restores the values from JetStream.
    h2 = Host(url=cluster.urls[1], name=name)
    nats_net.made.append(h2)
    late2 = nats_net.client(h2, 2)
    wait_for(lambda: late2.get("cfg") == {"v": 1}, timeout=15, what="the value from KV")
    h2.clear_retained()


def test_host_subscriptions_count_a_client_lost_without_goodbye(net: Net) -> None:
    # Over TCP a lost session is kept for a resume by default (nothing missing yet):
    # without resume (always the case over NATS) the loss is a gap at once.
    h = net.host(heartbeat=0.5, resume_window=0)
    sub = h.subscribe("alive")
    polite = net.client(h, 1, name="polite")
    polite.write("alive", 0)
    assert sub.get(timeout=10)[0] == 0
    polite.close()  # a goodbye: nothing can be missing
    wait_for(lambda: not h.clients(), timeout=10, what="the polite client gone")
    assert sub.gaps == 0
    where = str(h.port) if net.kind == "tcp" else net.cluster.urls[2]
    with _doomed_client(where, h.name or "") as proc:
        assert sub.get(timeout=10)[0] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: sub.gaps == 1, timeout=10, what="the gap counted")
    assert not h.clients()


def test_host_subscriptions_count_a_gap_when_the_hosts_node_dies(nats_net: Net) -> None:
    """The host's own NATS server dies: every session may have lost units, so the host
    ends them (its link fails over), its subscriptions count a gap, and the clients
    reconnect and write again."""
    h = nats_net.host()
    c = nats_net.client(h, 1, name="writer")
    _connected(h, 1)
    sub = h.subscribe("n")
    c.write("n", 0)
    assert sub.get(timeout=10)[0] == 0
    nats_net.cluster.kill(0)
    wait_for(lambda: sub.gaps >= 1, timeout=20, what="the host's gap")
    wait_for(lambda: c.reconnects >= 1 and h.clients(), timeout=20, what="the client back")
    c.write("n", 1)
    assert sub.get(timeout=10)[0] == 1


# -- the asyncio layer -------------------------------------------------------------------------


def test_asyncio_layer(sync_net: Net) -> None:
    """The asyncio layer, the same program over direct TCP and over NATS."""
    import asyncio

    from socketengine import aio

    name = f"aio-{uuid.uuid4().hex[:8]}"

    def make_host() -> Any:
        if sync_net.kind == "tcp":
            return aio.Host(port=0)
        return aio.Host(url=sync_net.cluster.urls[0], name=name)

    def make_client(h: Any, node: int, who: str) -> Any:
        if sync_net.kind == "tcp":
            return aio.Client(port=h.port, name=who, connect_timeout=10)
        return aio.Client(url=sync_net.cluster.urls[node], host=name, name=who, connect_timeout=10)

    async def until(cond: Any, what: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not cond():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)  # polling a condition, bounded by the deadline

    async def main() -> None:
        joined: List[str] = []
        async with make_host() as h:
            h.on_connect(lambda conn: joined.append(conn.name))
            h.on("double", lambda v, conn: v * 2)
            await h.write_all("cfg", {"r": 1}, retain=True)
            async with make_client(h, 1, "a") as a:
                async with make_client(h, 2, "b") as b:
                    await until(lambda: len(h.clients()) == 2, "two clients")
                    assert sorted(joined) == ["a", "b"]
                    await until(lambda: b.get("cfg") == {"r": 1}, "the retained value")
                    await a.write("x", 1)
                    await b.write("x", 2)
                    await until(lambda: sorted(h.get_all("x")) == [1, 2], "get_all")
                    assert await h.write_all("all", "v") == 2
                    await until(lambda: a.get("all") == b.get("all") == "v", "write_all")
                    assert await a.request("double", 4, timeout=10) == 8
                    b.on("who", lambda v: f"b:{v}")
                    conn = h.get_client("b")
                    assert conn is not None
                    assert await conn.request("who", 1, timeout=10) == "b:1"
                    big = os.urandom(2_500_000)
                    await a.write("big", big)
                    await until(lambda: h.get("big") == big, "a value above max_payload")
            await until(lambda: not h.clients(), "the clients gone")
            h.clear_retained()

    asyncio.run(main())


# -- failover ----------------------------------------------------------------------------------


def _reader(sub: Any, got: List[Any], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            got.append((time.monotonic(), sub.get(timeout=0.1)))
        except TimeoutError:
            continue
        except Exception:  # noqa: BLE001 (the subscription ended)
            return


def test_killing_a_node_mid_stream_fails_its_clients_over(nats_net: Net) -> None:
    """Node B dies while the host (on A) streams numbered values: the client on B
    reconnects through A or C and goes on, its subscription counts the gap, retained
    values come back; the client on C loses nothing.  Prints the recovery time."""
    cluster = nats_net.cluster
    h = nats_net.host()
    h.write_all("cfg", "kept", retain=True)
    on_b = nats_net.client(h, 1, name="on-b")
    on_c = nats_net.client(h, 2, name="on-c")
    _connected(h, 2)
    subs = [on_b.subscribe("n", maxsize=100_000), on_c.subscribe("n", maxsize=100_000)]
    got: List[List[Any]] = [[], []]
    stop = threading.Event()
    sent: List[int] = []

    def writer() -> None:
        for i in range(20_000):  # bounded: ~40 s at most
            if stop.wait(0.002):
                return
            h.write_all("n", i)
            sent.append(i)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=_reader, args=(subs[k], got[k], stop)) for k in (0, 1)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(got[0]) > 50 and len(got[1]) > 50, timeout=10, what="the stream")
        killed_at = time.monotonic()
        last_before = sent[-1]
        cluster.kill(1)
        wait_for(
            lambda: got[0] and got[0][-1][1] > last_before + 50,
            timeout=20,
            what="the client on B receiving again",
        )
        on_b.write("back", 1)
        wait_for(lambda: h.get("back") == 1, timeout=10, what="a write after failover")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    recovered = next(t for t, v in got[0] if t > killed_at and v > last_before) - killed_at
    values_b = [v for _, v in got[0]]
    values_c = [v for _, v in got[1]]
    assert values_b == sorted(values_b) and len(set(values_b)) == len(values_b)  # in order
    lost_b = (values_b[-1] - values_b[0] + 1) - len(values_b)
    print(f"\nfailover: recovered in {recovered:.3f} s, lost {lost_b} of {len(sent)} values")
    assert on_b.reconnects >= 1 and subs[0].gaps >= 1  # the gap is reported, not hidden
    assert on_b.get("cfg") == "kept"  # retained values replayed on the new session
    # The client on C never lost its server: everything, in order.
    assert values_c == list(range(values_c[0], values_c[0] + len(values_c)))
    assert subs[1].gaps == 0
    assert recovered < 15


# -- listing hosts -----------------------------------------------------------------------------


def test_hosts_on_a_cluster_are_listed_in_one_call_and_one_command(nats_net: Net) -> None:
    from socketengine import nats_hosts

    urls = ",".join(nats_net.cluster.urls)
    h = nats_net.host(name=f"listed {uuid.uuid4().hex[:6]}.*")  # any name, safely mapped
    # A listing is read from any replica (direct get): one that lags may miss a host
    # announced a moment ago, so each way of listing is waited for, not read once.
    info = wait_for(lambda: nats_hosts(urls).get(h.name), timeout=10, what="the host listed")
    assert info["pid"] == os.getpid()

    def command() -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [sys.executable, "-m", "socketengine", "hosts", urls, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out

    wait_for(lambda: h.name in command().stdout, timeout=10, what="the host listed by the CLI")
    h.close()
    wait_for(lambda: h.name not in nats_hosts(urls), timeout=10, what="the host unlisted")


def test_the_hosts_command_says_when_no_server_answers() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = subprocess.run(
        [sys.executable, "-m", "socketengine", "hosts", f"nats://127.0.0.1:{port}"]
        + ["--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and f"127.0.0.1:{port}" in out.stderr


# -- TLS and user/password -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_nodes(tmp_path_factory: Any) -> Iterator[Any]:
    from certs import self_signed
    from nats_cluster import start_cluster

    cert, key = self_signed(tmp_path_factory.mktemp("nats-tls-ep"), "localhost")
    cluster = start_cluster(3, user="cam", password="pw", tls_cert=str(cert), tls_key=str(key))
    cluster.ca = str(cert)
    yield cluster
    cluster.stop()


def test_tls_and_credentials_map_onto_nats(tls_nodes: Any) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=tls_nodes.ca)
    a, b = (u.replace("nats://", "nats://cam:pw@") for u in tls_nodes.urls[:2])
    with pytest.raises(AuthenticationError):
        Host(url=a.replace(":pw@", ":wrong@"), name="tls", tls=ctx, connect_timeout=5)
    with Host(url=a, name="tls", tls=ctx) as h:
        with Client(url=b, host="tls", tls=ctx, connect_timeout=10) as c:
            c.write("x", b"y" * 1_500_000)
            wait_for(lambda: h.get("x") is not None, timeout=10, what="the value over TLS")
            assert len(h.get("x")) == 1_500_000


def test_images_newest_frame_wins_for_a_slow_receiver(sync_net: Net) -> None:
    np = pytest.importorskip("numpy")
    h = sync_net.host()
    fast = sync_net.client(h, 1, name="fast")
    slow = sync_net.client(h, 2, name="slow")
    _connected(h, 2)
    release = threading.Event()
    # An inline callback that blocks stops the slow client's I/O thread: it reads nothing.
    slow.on("stall", lambda v: release.wait(30), inline=True)
    h.get_client("slow").write("stall", 1)
    frames_seen: List[int] = []
    slow_seen: List[int] = []
    fast.on("image", lambda img: frames_seen.append(int(img[0, 0, 0])))
    slow.on("image", lambda img: slow_seen.append(int(img[0, 0, 0])))
    img = np.zeros((480, 640, 3), np.uint8)
    try:
        for i in range(100):
            img[0, 0, 0] = i
            h.write_image_all(img)
            if i % 10 == 9:
                # The fast client keeps up: the stalled one does not hold it back.
                wait_for(lambda i=i: frames_seen and frames_seen[-1] == i, timeout=10, what="fast")
    finally:
        release.set()
    wait_for(
        lambda: slow.get("image") is not None and int(slow.get("image")[0, 0, 0]) == 99,
        timeout=20,
        what="the newest frame at the slow client",
    )
    assert len(slow_seen) < 100  # older frames were dropped for it (conflation) ...
    assert frames_seen[-1] == 99  # ... not for the fast one, which saw the newest at once
    assert fast.connected and slow.connected
    assert h.get_client("fast") is not None and h.get_client("slow") is not None


# -- one gateway per process ---------------------------------------------------------------------


def test_the_endpoints_of_a_process_share_one_gateway(nats_net: Net) -> None:
    """Clients on one node share one NATS connection and its two threads; a broadcast
    reaches each of them once; the last one to close closes the connection."""
    h = nats_net.host()
    first = nats_net.client(h, 1, name="c0")
    hub = first._gateway.hub
    before = set(threading.enumerate())
    clients = [first] + [nats_net.client(h, 1, name=f"c{i}") for i in range(1, 6)]
    _connected(h, 6)
    assert all(c._gateway.hub is hub for c in clients) and hub.refs == 6
    new = [t.name for t in set(threading.enumerate()) - before]
    assert not [n for n in new if n.startswith("socketengine-nats")]  # one link, one selector
    assert h._gateway.hub is not hub  # the host is on another node: its own connection
    subs = [c.subscribe("n") for c in clients]
    for i in range(50):
        h.write_all("n", i)
    h.get_client("c3").write("n", "only c3")
    for k, sub in enumerate(subs):
        got = [sub.get(timeout=10) for _ in range(50 + (k == 3))]
        assert [v for v in got if v != "only c3"] == list(range(50)), k  # once, in order
    clients[0].close()
    assert hub.refs == 5 and hub.link is not None
    h.write_all("after", 1)
    wait_for(lambda: all(c.get("after") == 1 for c in clients[1:]), what="the others")
    for c in clients[1:]:
        c.close()
    assert hub.link is None and hub.closed
    assert hub._thread is not None and not hub._thread.is_alive()


def test_stale_socket_directories_of_killed_processes_are_removed(nats_net: Net) -> None:
    import glob
    import tempfile

    from socketengine.transport.nats.gateway import remove_stale_dirs

    h = nats_net.host()
    with _doomed_client(nats_net.cluster.urls[1], h.name) as proc:
        pattern = os.path.join(tempfile.gettempdir(), f"se-nats-{proc.pid}-*")
        assert len(glob.glob(pattern)) == 1
    stale = glob.glob(pattern)
    assert len(stale) == 1  # SIGKILL: the directory stays behind ...
    mine = glob.glob(os.path.join(tempfile.gettempdir(), f"se-nats-{os.getpid()}-*"))
    assert mine  # (this process's own host directory)
    # ... until the next process starts its first NATS endpoint.
    code = (
        "import shutil\n"
        "from socketengine.transport.nats.gateway import private_socket_dir\n"
        "shutil.rmtree(private_socket_dir())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert not glob.glob(pattern)
    assert all(os.path.isdir(d) for d in mine)  # a live process's directories stay
    assert not any(d in mine for d in remove_stale_dirs())
