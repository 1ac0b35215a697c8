"""A reconnecting Client survives a failure at every step of a connection attempt.

The operating system will not make ``getpeername()`` raise ENOTCONN on demand (the host
must reset the connection in the microseconds between two calls), so the OS error is
injected at one step of one attempt by socket / SSL-context / Connection subclasses.
Everything else is real: a real host, a real proxy whose reset ends the first
connection, real sockets.  The client must close the failed attempt and try again.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest
from certs import self_signed
from conftest import wait_for
from faults import CuttingProxy

import socketengine.sync.client as client_module
from socketengine import Client, Host

_armed: List[Optional[str]] = [None]
_fired: List[str] = []


def _fire(step: str) -> bool:
    """True (once) when the armed fault is ``step``."""
    if _armed[0] == step:
        _armed[0] = None
        _fired.append(step)
        return True
    return False


class _FlakySocket(socket.socket):
    def connect_ex(self, address: Any) -> int:
        if _fire("connect_ex"):
            raise OSError(errno.ENETUNREACH, "injected: network is unreachable")
        return super().connect_ex(address)

    def getsockopt(self, *args: Any) -> Any:
        if args[:2] == (socket.SOL_SOCKET, socket.SO_ERROR) and _fire("so_error"):
            raise OSError(errno.ENOTCONN, "injected: not connected")
        return super().getsockopt(*args)

    def setsockopt(self, *args: Any) -> None:
        if args[:2] == (socket.IPPROTO_TCP, socket.TCP_NODELAY) and _fire("nodelay"):
            raise OSError(errno.EINVAL, "injected: invalid argument")
        super().setsockopt(*args)

    def getpeername(self) -> Any:
        if _fire("getpeername"):
            raise OSError(errno.ENOTCONN, "injected: not connected")
        return super().getpeername()

    def send(self, data: Any, *args: Any) -> int:
        if _fire("first_send"):
            raise BrokenPipeError(errno.EPIPE, "injected: broken pipe")
        return super().send(data, *args)


class _SocketModule:
    """The socket module as the client sees it, with sockets that can fail once."""

    socket = _FlakySocket

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


class _FlakyConnection(client_module.Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _fire("connection"):
            raise OSError(errno.EBADF, "injected: bad file descriptor")
        super().__init__(*args, **kwargs)


class _FlakySSLSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        if _fire("tls_first_step"):
            raise ConnectionResetError(errno.ECONNRESET, "injected: connection reset")
        super().do_handshake(block)


class _FlakyContext(ssl.SSLContext):
    sslsocket_class = _FlakySSLSocket

    def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
        if _fire("tls_wrap"):
            raise ssl.SSLError("injected: TLS set-up failed")
        return super().wrap_socket(*args, **kwargs)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("certs"), "flaky")


@pytest.fixture(autouse=True)
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(client_module, "socket", _SocketModule())
    monkeypatch.setattr(client_module, "Connection", _FlakyConnection)
    _armed[0] = None
    _fired.clear()
    yield
    _armed[0] = None


PLAIN = ["connect_ex", "so_error", "nodelay", "getpeername", "connection", "first_send"]
TLS = ["tls_wrap", "tls_first_step"]


@pytest.mark.parametrize("step", PLAIN + TLS)
def test_a_failed_reconnection_attempt_is_retried(step: str, cert: tuple[Path, Path]) -> None:
    host_tls = client_tls = None
    if step in TLS:
        host_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        host_tls.load_cert_chain(*cert)
        client_tls = _FlakyContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.load_verify_locations(cafile=str(cert[0]))
    with Host(port=0, tls=host_tls) as h, CuttingProxy(h.port) as proxy:
        c = Client(port=proxy.port, tls=client_tls, name="flaky", reconnect_max=0.2)
        try:
            c.write("n", 0)
            wait_for(lambda: h.get("n") == 0)
            _armed[0] = step  # the next attempt fails at this step
            proxy.cut_reset()
            wait_for(
                lambda: c.reconnects == 1,
                timeout=10,
                what=f"a reconnection after a failure at {step}",
            )
            assert _fired == [step]  # the fault did happen, once
            c.write("n", 1)
            wait_for(lambda: h.get("n") == 1)
            assert [conn.name for conn in h.clients()] == ["flaky"]
        finally:
            c.close()
