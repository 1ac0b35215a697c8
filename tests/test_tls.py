"""TLS: throw-away self-signed certificates made at run time."""

import ssl
from pathlib import Path

import numpy as np
import pytest
from certs import self_signed
from conftest import wait_for

from socketengine import Client, HandshakeError, Host

pytest.importorskip("cryptography.x509")  # the whole module needs it


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("certs")
    return {"good": self_signed(d, "good"), "other": self_signed(d, "other")}


def _server(certs: dict) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certs["good"])
    return ctx


def _client(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def test_tls_pair_exchanges_values_and_images(certs: dict) -> None:
    with (
        Host(port=0, tls=_server(certs)) as h,
        Client(port=h.port, tls=_client(certs["good"][0]), name="secure") as c,
    ):
        conn = wait_for(lambda: h.clients() and h.clients()[0])  # the host may lag the client
        assert conn.socket.version() is not None  # type: ignore[attr-defined]
        c.write("a", {"x": [1, 2, 3]})
        frame = np.random.default_rng(0).integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        c.write_image(frame)
        wait_for(lambda: h.get("a") == {"x": [1, 2, 3]} and h.get("image") is not None)
        assert np.array_equal(h.get("image"), frame)
        big = b"z" * 3_000_000  # many TLS records each way
        h.write_all("big", big)
        wait_for(lambda: c.get("big") == big)
        assert h.get_client("secure") is not None
        for i in range(2000):
            c.write("seq", i)
        wait_for(lambda: h.get("seq") == 1999)


def test_tls_with_token(certs: dict) -> None:
    with (
        Host(port=0, tls=_server(certs), token="t") as h,
        Client(port=h.port, tls=_client(certs["good"][0]), token="t") as c,
    ):
        c.write("ok", 1)
        wait_for(lambda: h.get("ok") == 1)


def test_plaintext_client_is_refused_by_a_tls_host(certs: dict) -> None:
    with Host(port=0, tls=_server(certs)) as h:
        with pytest.raises(HandshakeError, match="TLS"):
            Client(port=h.port, handshake_timeout=5)
        good = Client(port=h.port, tls=_client(certs["good"][0]))
        good.write("still", "fine")
        wait_for(lambda: h.get("still") == "fine")
        good.close()


def test_tls_client_to_a_plaintext_host_fails_clearly(certs: dict) -> None:
    with Host(port=0) as h:
        with pytest.raises(HandshakeError, match="TLS"):
            Client(port=h.port, tls=_client(certs["good"][0]), handshake_timeout=5)


def test_client_refuses_a_host_with_the_wrong_certificate(certs: dict) -> None:
    with Host(port=0, tls=_server(certs)) as h:
        with pytest.raises(HandshakeError, match="certificate"):
            Client(port=h.port, tls=_client(certs["other"][0]), handshake_timeout=5)
        assert wait_for(lambda: not h._conns, what="the refused connection to go")


def test_tls_must_be_an_ssl_context() -> None:
    with pytest.raises(TypeError, match="SSLContext"):
        Host(port=0, tls="cert.pem", open=False)  # type: ignore[arg-type]
