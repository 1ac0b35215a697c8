"""The seed README's API, verbatim: names, parameters, defaults, examples."""

import inspect
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for

import socketengine
from socketengine import Client, ConnectTimeout, EndpointClosed, Host, client, host

SEED_DIR = Path(__file__).parent / "seed"
SEED_PARAMS = [
    ("addr", "127.0.0.1"),
    ("port", 8080),
    ("timeout", 2),
    ("size", 256),
    ("open", True),
]


def test_seed_names_are_aliases_of_the_pep8_names() -> None:
    assert host is Host and client is Client
    assert Host.get_ALL is Host.get_all
    assert Host.getClients is Host.clients
    assert Host.write_ALL is Host.write_all and Host.writeLock_ALL is Host.write_all
    assert Host.writeImg_ALL is Host.write_image_all
    assert Host.writeImgLock_ALL is Host.write_image_all
    assert Client.writeLock is Client.write
    assert Client.writeImg is Client.write_image and Client.writeImgLock is Client.write_image


@pytest.mark.parametrize("cls", [host, client])
def test_constructor_parameters_and_defaults_match_the_seed(cls: type) -> None:
    params = list(inspect.signature(cls).parameters.values())[: len(SEED_PARAMS)]
    assert [(p.name, p.default) for p in params] == SEED_PARAMS


def test_every_seed_method_exists() -> None:
    for name in [
        "set_timeout",
        "start",
        "get_ALL",
        "getClients",
        "writeLock_ALL",
        "write_ALL",
        "writeImgLock_ALL",
        "writeImg_ALL",
        "close",
    ]:
        assert callable(getattr(Host, name)), name
    for name in [
        "set_timeout",
        "start",
        "get",
        "writeLock",
        "write",
        "writeImgLock",
        "writeImg",
        "close",
    ]:
        assert callable(getattr(Client, name)), name


def test_seed_examples_run_verbatim_in_separate_processes() -> None:
    """The README's host loop and client script, unchanged, in two processes."""
    h = subprocess.Popen(
        [sys.executable, str(SEED_DIR / "run_seed.py"), "host"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = h.stderr.readline()  # type: ignore[union-attr]
        assert line.startswith("PORT "), line
        port = line.split()[1]
        for _ in range(3):  # every time, not just once
            c = subprocess.run(
                [sys.executable, str(SEED_DIR / "run_seed.py"), "client", port],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert c.returncode == 0, c.stderr
        printed = h.stdout.readline()  # type: ignore[union-attr]
        assert printed == "client is connected!\n"
    finally:
        h.kill()
        h.wait(10)


def test_client_that_writes_and_closes_at_once_is_still_seen(host: Host) -> None:
    """The seed client writes one value and closes immediately: nothing is lost."""
    for i in range(20):
        c = client(port=host.port)
        c.start()
        c.write("test", f"client {i} is connected!")
        c.close()
    values = wait_for(lambda: len(host.get_ALL("test")) == 20 and host.get_ALL("test"))
    assert values == [f"client {i} is connected!" for i in range(20)]
    wait_for(lambda: host.getClients() == [], what="departed clients to leave getClients()")


def test_departed_clients_are_bounded() -> None:
    with Host(port=0, keep_departed=3) as h:
        for i in range(6):
            with Client(port=h.port) as c:
                c.write("v", i)
        wait_for(lambda: h.get_all("v") == [3, 4, 5], what="last three departed values")


def test_get_returns_none_and_get_all_empty_before_data(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    assert c.get("nothing") is None
    assert host.get_ALL("nothing") == []
    assert host.get("nothing") is None


def test_open_false_defers_and_start_chains() -> None:
    h = host(port=0, open=False)
    assert not h.opened and not h.stopped
    assert h.start() is h
    assert h.opened and h.port != 0
    c = client(port=h.port, open=False)
    assert not c.opened
    c.open()
    assert c.opened
    c2 = client(port=h.port).start()
    assert isinstance(c2, Client)
    for endpoint in (c, c2, h):
        endpoint.close()
        assert endpoint.stopped and not endpoint.opened
        endpoint.close()  # idempotent


def test_open_false_then_start_opens() -> None:
    h = Host(port=0, open=False)
    c = Client(port=0, open=False)
    h.start()
    c.port  # noqa: B018 - still the constructor's value
    c = Client(port=h.port, open=False).start()
    c.write("a", 1)
    wait_for(lambda: h.get("a") == 1)
    c.close()
    h.close()


def test_set_timeout(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    c.set_timeout(0.5)
    host.set_timeout(3)
    assert c.timeout == 0.5 and host.timeout == 3.0
    with pytest.raises(ValueError):
        c.set_timeout(-1)


def test_size_is_a_floor_hint_not_a_read_limit() -> None:
    with Host(port=0, size=256) as h, Client(port=h.port, size=256) as c:
        assert h.read_size == 262144 and c.read_size == 262144  # MIN_READ_SIZE
        big = "x" * 1_000_000
        c.write("big", big)
        wait_for(lambda: h.get("big") == big)
    assert Host(port=0, size=1 << 20, open=False).read_size == 1 << 20


def test_both_directions_and_locked_variants(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    c.writeLock("up", {"n": 1})
    c.write("up2", [1, 2])
    wait_for(lambda: host.get_ALL("up") == [{"n": 1}] and host.get_ALL("up2") == [[1, 2]])
    wait_for(lambda: len(host.getClients()) == 1)
    host.writeLock_ALL("down", "a")
    host.write_ALL("down2", ("b", 2))
    wait_for(lambda: c.get("down") == "a" and c.get("down2") == ("b", 2))


def test_images_both_directions(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    c1, c2 = make_client(), make_client()
    c1.writeImg(frame)
    got = wait_for(lambda: host.get_ALL("image"))
    assert np.array_equal(got[0], frame) and got[0].dtype == np.uint8
    c2.writeImgLock(gray)
    wait_for(lambda: len(host.get_ALL("image")) == 2)
    assert np.array_equal(host.get_ALL("image")[1], gray)
    wait_for(lambda: len(host.getClients()) == 2)
    assert host.writeImg_ALL(frame) == 2
    for c in (c1, c2):
        wait_for(lambda c=c: c.get("image") is not None)
        assert np.array_equal(c.get("image"), frame)
    host.writeImgLock_ALL(gray)
    wait_for(lambda: all(c.get("image").shape == gray.shape for c in (c1, c2)))


def test_refused_images(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    with pytest.raises(TypeError, match="list"):
        c.writeImg([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="shape"):
        c.writeImg(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        host.writeImg_ALL(np.zeros(5, np.uint8))


def test_writes_are_thread_safe(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    n = 2000

    def writer(k: int) -> None:
        for i in range(n):
            c.write(f"t{k}", [k, i, "x" * (i % 50)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        wait_for(lambda k=k: host.get(f"t{k}") == [k, n - 1, "x" * ((n - 1) % 50)])


def test_connect_timeout_names_addr_and_port() -> None:
    # A bound socket that never listens: connections to it are refused.
    reserve = socket.socket()
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]
    try:
        with pytest.raises(ConnectTimeout, match=f"127.0.0.1:{port}") as info:
            Client(port=port, connect_timeout=0.3)
        assert isinstance(info.value, ConnectionError)
    finally:
        reserve.close()


def test_client_open_waits_until_the_host_accepts() -> None:
    reserve = socket.socket()
    reserve.bind(("127.0.0.1", 0))
    port = reserve.getsockname()[1]
    result: dict = {}

    def connect() -> None:
        try:
            result["client"] = Client(port=port, connect_timeout=20)
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    t = threading.Thread(target=connect)
    t.start()
    try:
        assert not t.is_alive() or "client" not in result
        reserve.close()
        h = Host(port=port)
        t.join(25)
        assert "client" in result, result
        result["client"].write("hello", 1)
        wait_for(lambda: h.get("hello") == 1)
        result["client"].close()
        h.close()
    finally:
        reserve.close()


def test_closed_endpoints_refuse_writes(host: Host) -> None:
    c = Client(port=host.port)
    c.close()
    with pytest.raises(EndpointClosed, match="closed"):
        c.write("a", 1)
    with pytest.raises(EndpointClosed):
        c.start()
    h = Host(port=0)
    h.close()
    with pytest.raises(EndpointClosed):
        h.write_all("a", 1)


def test_package_exports() -> None:
    for name in socketengine.__all__:
        assert hasattr(socketengine, name), name
