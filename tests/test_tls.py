"""TLS: throw-away self-signed certificates made at run time."""

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from conftest import wait_for

from socketengine import Client, HandshakeError, Host

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _self_signed(directory: Path, name: str) -> Tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("certs")
    return {"good": _self_signed(d, "good"), "other": _self_signed(d, "other")}


def _server(certs: dict) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certs["good"])
    return ctx


def _client(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def test_tls_pair_exchanges_values_and_images(certs: dict) -> None:
    with Host(port=0, tls=_server(certs)) as h, Client(
        port=h.port, tls=_client(certs["good"][0]), name="secure"
    ) as c:
        assert h.clients()[0].socket.version() is not None  # type: ignore[attr-defined]
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
    with Host(port=0, tls=_server(certs), token="t") as h, Client(
        port=h.port, tls=_client(certs["good"][0]), token="t"
    ) as c:
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
