"""Unix domain sockets: ``addr="unix:///path"`` for hosts and clients of both layers."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_parity import LAYERS, AioThread, loop_thread, make_client  # noqa: F401

from socketengine import Client, Host, aio

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets here")


@pytest.mark.parametrize("layer", LAYERS)
def test_values_arrays_and_requests_over_a_unix_socket(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
    tmp_path: Path,
) -> None:
    np = pytest.importorskip("numpy")
    addr = f"unix://{tmp_path}/app.sock"
    with Host(addr=addr) as host:
        host.on("add", lambda numbers, conn: sum(numbers))
        mode = stat.S_IMODE(os.stat(tmp_path / "app.sock").st_mode)
        assert mode == 0o600  # this user only: file permissions are the access control
        client = make_client(layer, loop_thread, 0, addr=addr, name="local")
        try:
            client.do("write", "pose", [1, 2])
            client.do("write", "frame", np.arange(12, dtype=np.float32).reshape(3, 4))
            assert client.do("request", "add", [1, 2, 3], timeout=5) == 6
            wait_for(lambda: host.get("frame") is not None)
            assert host.get("pose") == [1, 2]
            assert host.get("frame").tolist() == np.arange(12).reshape(3, 4).tolist()
            (conn,) = host.clients()
            assert conn.name == "local" and str(tmp_path) in conn.address[0]
            host.write_all("cmd", "go")
            wait_for(lambda: client.ep.get("cmd") == "go")
        finally:
            client.close()


def test_an_asyncio_host_on_a_unix_socket_and_a_stale_file(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "h.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file left behind by a host that died
    stale.close()

    async def main() -> Any:
        async with aio.Host(addr=f"unix://{path}") as h:
            loop = asyncio.get_running_loop()

            def use() -> Any:
                with Client(addr=f"unix://{path}", connect_timeout=5) as c:
                    c.write("x", 1, ack=True)
                    return h.get("x")

            return await loop.run_in_executor(None, use)

    assert asyncio.run(main()) == 1


def test_a_second_host_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    addr = f"unix://{tmp_path}/one.sock"
    with Host(addr=addr):
        with pytest.raises(OSError, match="another host"):
            Host(addr=addr)


def test_a_client_waits_for_the_socket_file_then_times_out(tmp_path: Path) -> None:
    from socketengine import ConnectTimeout

    with pytest.raises(ConnectTimeout):
        Client(addr=f"unix://{tmp_path}/nobody.sock", connect_timeout=0.3)


@pytest.mark.parametrize("layer", LAYERS)
def test_closing_a_host_removes_its_socket_file(
    layer: str,
    loop_thread: AioThread,  # noqa: F811
    tmp_path: Path,
) -> None:
    from test_parity import make_host

    path = tmp_path / "gone.sock"
    host = make_host(layer, loop_thread, addr=f"unix://{path}")
    assert path.exists()
    host.close()
    assert not path.exists()
