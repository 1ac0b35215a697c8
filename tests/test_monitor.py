"""The live browser monitor: rendering, frames, HTTP, tokens, and the page in a real
headless Chromium (Debian's ``chromium`` driven by Playwright; skipped when either is
absent, unless SOCKETENGINE_REQUIRE_BROWSER=1, as CI sets, makes that a failure).

Set SOCKETENGINE_MONITOR_SCREENSHOT=docs/monitor.png to save the browser test's
screenshot there (the README shows it).
"""

from __future__ import annotations

import http.client
import inspect
import io
import json
import logging
import os
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from certs import self_signed
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socketengine import Client, Host
from socketengine.monitor import MAX_CONNECTIONS, Monitor, encode_image, encode_png
from socketengine.monitor.auth import Gate
from socketengine.monitor.state import View, same_value
from socketengine.render import describe, image_shape

np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def poll(condition: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Call ``condition`` until it returns something truthy (every 20 ms); fail after
    ``timeout`` seconds.  Exceptions count as "not yet" until the deadline."""
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while True:
        try:
            result = condition()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last}")
        time.sleep(0.02)


def get(
    url: str, headers: Optional[Dict[str, str]] = None, data: Optional[bytes] = None
) -> Tuple[int, Dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; HTTP errors are returned, not raised."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def state(monitor: Monitor, **headers: str) -> Dict[str, Any]:
    status, _, body = get(monitor.url + "api/state", headers)
    assert status == 200, body
    return json.loads(body)


def client_named(doc: Dict[str, Any], name: Optional[str]) -> Optional[Dict[str, Any]]:
    return next((c for c in doc["clients"] if c["name"] == name), None)


def channel_text(doc: Dict[str, Any], name: Optional[str], channel: str) -> Optional[str]:
    client = client_named(doc, name)
    if client is None:
        return None
    return next((ch["text"] for ch in client["channels"] if ch["name"] == channel), None)


@pytest.fixture
def monitored() -> Iterator[Tuple[Host, Monitor]]:
    host = Host(port=0)
    monitor = Monitor(host, port=0, image_format="png").start()
    yield host, monitor
    monitor.close()
    host.close()


# -- rendering ------------------------------------------------------------------------------


def test_describe_renders_short_json_like_text() -> None:
    assert describe({"x": 1.5, "tags": ("a", "b"), "ok": True, "none": None}) == (
        '{"x": 1.5, "tags": ("a", "b"), "ok": true, "none": null}'
    )
    assert describe([1, [2, [3]]]) == "[1, [2, [3]]]"
    assert describe("line\nbreak\x1b[31m") == '"line\\nbreak\\u001b[31m"'  # no raw ESC
    assert describe(b"\x89PNG\r\n\x1a\nmore") == "<12 bytes 89504e470d0a1a0a…>"
    assert describe(2**1000) == "<int of 1001 bits>"
    assert describe(float("nan")) == "nan"
    assert describe(np.float32(2.5)) == "2.5"
    assert describe(np.zeros((480, 640, 3), np.uint8)) == "<ndarray 480x640x3 uint8>"
    assert describe(np.arange(3, dtype=np.int16)) == "<ndarray 3 int16 [0, 1, 2]>"
    assert describe(object()) == "<object>"


def test_describe_cuts_long_values_within_the_limit() -> None:
    text = describe("x" * 10_000, limit=60)
    assert len(text) <= 60 and text.endswith("… (10000 chars)")
    nested = describe({"k": list(range(100_000))}, limit=50)
    assert len(nested) <= 50 and nested.endswith("…")
    deep: Any = []
    for _ in range(50):
        deep = [deep]
    assert "…" in describe(deep, limit=200)


def test_image_shape_accepts_uint8_images_only() -> None:
    assert image_shape(np.zeros((4, 5), np.uint8)) == (4, 5, 1)
    assert image_shape(np.zeros((4, 5, 3), np.uint8)) == (4, 5, 3)
    assert image_shape(np.zeros((4, 5, 4), np.uint8)) == (4, 5, 4)
    assert image_shape(np.zeros((4, 5, 1), np.uint8)) == (4, 5, 1)
    assert image_shape(np.zeros((4, 5, 3), np.float32)) is None
    assert image_shape(np.zeros((4, 5, 2), np.uint8)) is None
    assert image_shape(np.zeros((0, 5), np.uint8)) is None
    assert image_shape(np.zeros(5, np.uint8)) is None
    assert image_shape([[1, 2]]) is None


def test_png_encoder_is_exact() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    for shape in [(7, 9), (7, 9, 3), (7, 9, 4)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        decoded = np.asarray(image_mod.open(io.BytesIO(encode_png(img))))
        assert np.array_equal(decoded, img), shape


def test_encode_image_scales_swaps_and_picks_a_format() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    img = np.zeros((100, 3000, 3), np.uint8)
    img[..., 2] = 200  # blue in RGB, red in BGR
    data, kind = encode_image(img, max_width=1000, image_format="png")
    decoded = np.asarray(image_mod.open(io.BytesIO(data)))
    assert kind == "image/png" and decoded.shape == (34, 1000, 3)
    data, _ = encode_image(img, bgr=True, image_format="png")
    assert np.asarray(image_mod.open(io.BytesIO(data)))[0, 0].tolist() == [200, 0, 0]
    data, kind = encode_image(img[:, :64])
    assert kind == "image/jpeg" and data[:3] == b"\xff\xd8\xff"
    data, kind = encode_image(np.zeros((8, 8, 4), np.uint8), image_format="jpeg")
    assert kind == "image/jpeg"


# -- HTTP -------------------------------------------------------------------------------------


def test_page_is_one_static_file_with_a_strict_policy(monitored: Tuple[Host, Monitor]) -> None:
    _, monitor = monitored
    status, headers, body = get(monitor.url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    page = body.decode()
    for external in ("<script src", "<link", 'src="http', 'href="http', "url(", "@import"):
        assert external not in page  # no CDN, nothing fetched from elsewhere


def test_state_lists_clients_values_and_counters(monitored: Tuple[Host, Monitor]) -> None:
    host, monitor = monitored
    t0 = time.time()
    with Client(port=host.port, name="alpha") as c, Client(port=host.port) as anon:
        c.write("pose", {"x": 1.5})
        anon.write("n", 7)
        poll(lambda: channel_text(state(monitor), None, "n") == "7", what="the unnamed client")
        poll(lambda: channel_text(state(monitor), "alpha", "pose"), what="alpha's value")
        doc = state(monitor)
        alpha = client_named(doc, "alpha")
        assert alpha is not None
        assert channel_text(doc, "alpha", "pose") == '{"x": 1.5}'
        assert alpha["address"].startswith("127.0.0.1:")
        assert t0 - 1 <= alpha["since"] <= time.time() + 1
        assert alpha["bytes_in"] > 0 and alpha["messages_in"] == 1
        assert doc["host"]["port"] == host.port and doc["host"]["open"] is True
        assert abs(doc["now"] - time.time()) < 5
        c.write("pose", {"x": 2.5})
        poll(lambda: channel_text(state(monitor), "alpha", "pose") == '{"x": 2.5}', what="update")
    poll(lambda: state(monitor)["clients"] == [], what="clients to leave")


def test_frame_is_the_newest_and_encoded_once(monitored: Tuple[Host, Monitor]) -> None:
    host, monitor = monitored
    image_mod = pytest.importorskip("PIL.Image")
    with Client(port=host.port, name="cam") as c:
        for i in range(30):  # a burst: only the newest frame matters
            c.write_image(np.full((24, 32, 3), i, np.uint8))
        poll(lambda: host.get("image") is not None and host.get("image")[0, 0, 0] == 29)
        doc = state(monitor)
        (image,) = doc["images"]
        assert image["client"] == "cam" and image["shape"] == [24, 32, 3]
        url = f"{monitor.url}frame?s={image['session']}&c=image"
        status, headers, body = get(url)
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert np.array_equal(
            np.asarray(image_mod.open(io.BytesIO(body))), np.full((24, 32, 3), 29, np.uint8)
        )
        status, headers2, body2 = get(url)
        assert headers2["X-Frame-Seq"] == headers["X-Frame-Seq"] and body2 == body
        c.write_image(np.full((24, 32, 3), 99, np.uint8))
        poll(lambda: host.get("image")[0, 0, 0] == 99)
        _, headers3, body3 = get(url)
        assert int(headers3["X-Frame-Seq"]) > int(headers["X-Frame-Seq"])
        assert np.asarray(image_mod.open(io.BytesIO(body3)))[0, 0, 0] == 99
        assert get(f"{monitor.url}frame?s={image['session']}&c=nope")[0] == 404
        assert get(f"{monitor.url}frame?s=x&c=image")[0] == 404


def test_compressed_frames_are_served_as_sent(monitored: Tuple[Host, Monitor]) -> None:
    if "codec" not in inspect.signature(Client.write_image).parameters:
        pytest.skip("this socketengine sends raw images only")
    image_mod = pytest.importorskip("PIL.Image")
    host, monitor = monitored
    frame = np.zeros((32, 48, 3), np.uint8)
    frame[:, :24] = (0, 0, 255)  # red on the left, in OpenCV's BGR order
    with Client(port=host.port, name="jpeg-cam") as c:
        c.write_image(frame, codec="png")  # lossless: exact pixels to compare
        poll(lambda: state(monitor)["images"], what="the image channel")
        (image,) = state(monitor)["images"]
        assert image["shape"] == [32, 48, 3]
        status, headers, body = get(f"{monitor.url}frame?s={image['session']}&c=image")
        assert status == 200 and headers["Content-Type"] == "image/png"
        shown = np.asarray(image_mod.open(io.BytesIO(body)).convert("RGB"))
        assert shown[0, 0].tolist() == [255, 0, 0] and shown[0, 47].tolist() == [0, 0, 0]


def test_bgr_option_swaps_raw_frames() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    frame = np.zeros((16, 24, 3), np.uint8)
    frame[..., 0] = 250  # blue in OpenCV's BGR order
    with Host(port=0) as host, Monitor(host, port=0, bgr=True, image_format="png") as monitor:
        assert monitor.bgr is True
        with Client(port=host.port, name="opencv") as c:
            c.write_image(frame)
            (image,) = poll(lambda: state(monitor)["images"], what="the image channel")
            status, _, body = get(f"{monitor.url}frame?s={image['session']}&c=image")
    assert status == 200
    assert np.asarray(image_mod.open(io.BytesIO(body)))[0, 0].tolist() == [0, 0, 250]


def _channel(doc: Dict[str, Any], client: str, name: str) -> Optional[Dict[str, Any]]:
    found = client_named(doc, client)
    if found is None:
        return None
    return next((c for c in found["channels"] if c["name"] == name), None)


def test_state_tells_updated_from_changed(monitored: Tuple[Host, Monitor]) -> None:
    host, monitor = monitored
    with Client(port=host.port, name="beat") as c:
        c.write("speed", 1.5)
        first = poll(lambda: _channel(state(monitor), "beat", "speed"), what="the value")
        assert first["updated"] == first["changed"]

        def received_again() -> Optional[Dict[str, Any]]:
            c.write("speed", 1.5)  # the same value, sent again (a new message)
            now = _channel(state(monitor), "beat", "speed")
            return now if now and now["updated"] > first["updated"] else None

        again = poll(received_again, what="the value re-sent to count as updated")
        assert again["changed"] == first["changed"] and again["text"] == "1.5"
        assert again["seq"] > first["seq"]
        c.write("speed", 2.5)

        def changed() -> Optional[Dict[str, Any]]:
            now = _channel(state(monitor), "beat", "speed")
            return now if now and now["text"] == "2.5" else None

        moved = poll(changed, what="the change")
        assert moved["changed"] > first["changed"] and moved["updated"] >= moved["changed"]


def test_view_tracks_receptions_and_changes() -> None:
    view = View(None)
    key = (1, "x")
    e = view.track(key, [1, 2], now=10.0)
    assert (e.seq, e.updated, e.changed, e.text) == (1, 10.0, 10.0, "[1, 2]")
    e = view.track(key, e.value, now=11.0)  # the same object: nothing new arrived
    assert (e.seq, e.updated, e.changed) == (1, 10.0, 10.0)
    e = view.track(key, [1, 2], now=12.0)  # an equal value, received again
    assert (e.seq, e.updated, e.changed) == (2, 12.0, 10.0)
    e = view.track(key, [1, 3], now=13.0)
    assert (e.seq, e.updated, e.changed, e.text) == (3, 13.0, 13.0, "[1, 3]")
    # The host's own receive time wins, and tells a re-sent shared object (True) apart.
    e = view.track((1, "flag"), True, now=20.0, received=19.5)
    e = view.track((1, "flag"), True, now=21.0, received=20.5)
    assert (e.seq, e.updated, e.changed) == (2, 20.5, 19.5)
    assert same_value(np.arange(4), np.arange(4)) and not same_value(np.arange(4), np.ones(4))
    assert not same_value(np.zeros((480, 640, 3), np.uint8), np.zeros((480, 640, 3), np.uint8))
    assert not same_value(1, 1.0) and same_value(float("inf"), float("inf"))


def _read_events(sock_file: Any, until: Callable[[str, Any], bool], timeout: float) -> None:
    """Read Server-Sent Events until ``until(event, data)`` is true (bounded)."""
    deadline = time.monotonic() + timeout
    event, data = "message", ""
    while time.monotonic() < deadline:
        line = sock_file.readline().decode()
        if not line:
            raise AssertionError("event stream closed")
        line = line.rstrip("\r\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            if until(event, json.loads(data)):
                return
            event, data = "message", ""
    raise AssertionError("no such event in time")


def test_event_stream_pushes_state_and_frames(monitored: Tuple[Host, Monitor]) -> None:
    host, monitor = monitored
    with Client(port=host.port, name="live") as c:
        c.write("status", "ready")
        c.write_image(np.zeros((8, 8), np.uint8))
        poll(lambda: host.get("image") is not None)
        conn = http.client.HTTPConnection("127.0.0.1", monitor.port, timeout=TIMEOUT)
        try:
            conn.request("GET", "/events")
            response = conn.getresponse()
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            seen: Dict[str, Any] = {}

            def first(event: str, data: Any) -> bool:
                seen[event] = data
                return "state" in seen and "frames" in seen

            _read_events(response, first, TIMEOUT)
            assert channel_text(seen["state"], "live", "status") == '"ready"'
            ((session, channel, seq),) = seen["frames"]
            assert channel == "image" and seq >= 1
            c.write("status", "moving")
            c.write_image(np.ones((8, 8), np.uint8))

            def moved(event: str, data: Any) -> bool:
                if event == "state":
                    seen["moved"] = channel_text(data, "live", "status") == '"moving"'
                if event == "frames":
                    seen["newer"] = data[0][2] > seq
                return bool(seen.get("moved") and seen.get("newer"))

            _read_events(response, moved, TIMEOUT)
        finally:
            conn.close()


def test_token_is_required_and_traded_for_a_cookie() -> None:
    with Host(port=0, token="s3cret") as host, Monitor(host, port=0) as monitor:
        base = monitor.url
        assert get(base)[0] == 200  # the page itself holds no data
        assert get(base + "api/state")[0] == 401
        assert get(base + "api/state?token=wrong")[0] == 401
        assert get(base + "api/state", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(base + "api/state", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(base + "events?token=nope")[0] == 401
        status, headers, _ = get(base + "?token=s3cret")
        assert status == 303 and headers["Location"] == "./"
        set_cookie = headers["Set-Cookie"]
        cookie = set_cookie.split(";")[0]
        attributes = [a.strip() for a in set_cookie.split(";")[1:]]
        assert "s3cret" not in cookie and "HttpOnly" in attributes
        assert "SameSite=Strict" in attributes and "Max-Age=43200" in attributes
        assert "Secure" not in attributes  # plain HTTP: a Secure cookie would be dropped
        assert get(base + "api/state", {"Cookie": cookie})[0] == 200
        tampered = cookie[:-1] + ("0" if cookie[-1] != "0" else "1")
        assert get(base + "api/state", {"Cookie": tampered})[0] == 401
        name, _, value = cookie.partition("=")
        expiry, _, mac = value.partition(".")
        later = f"{name}={int(expiry) + 3600}.{mac}"  # a longer life is not the same MAC
        assert get(base + "api/state", {"Cookie": later})[0] == 401
        assert get(base + "login", data=b"token=wrong")[0] == 401
        status, headers, _ = get(base + "login", data=b"token=s3cret")
        assert status == 204 and headers["Set-Cookie"].startswith("socketengine_monitor=")
        assert get(base + "api/state", {"Cookie": headers["Set-Cookie"].split(";")[0]})[0] == 200


def test_login_cookie_expires() -> None:
    gate = Gate(b"s3cret", "127.0.0.1", secure=True, max_age=60)
    header = gate.cookie_header()
    value = header.split(";")[0].split("=", 1)[1]
    assert "Max-Age=60" in header and "Secure" in header.split("; ")
    expiry = int(value.split(".")[0])
    assert abs(expiry - (time.time() + 60)) < 5
    assert gate.check_cookie(value)
    assert gate.check_cookie(value, now=expiry - 1)
    assert not gate.check_cookie(value, now=expiry + 1)  # expired: refused by the server too
    assert not Gate(b"other", "127.0.0.1", secure=True).check_cookie(value)
    for junk in ("", ".", "abc.def", "99999999999999999.00", value.replace(".", "")):
        assert not gate.check_cookie(junk)


def test_foreign_host_header_is_refused_on_loopback(monitored: Tuple[Host, Monitor]) -> None:
    _, monitor = monitored
    assert get(monitor.url + "api/state", {"Host": "attacker.example"})[0] == 403
    assert get(monitor.url + "api/state", {"Host": f"localhost:{monitor.port}"})[0] == 200


def _raw(monitor: Monitor, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", monitor.port), timeout=TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_bad_requests_get_clean_errors(monitored: Tuple[Host, Monitor]) -> None:
    _, monitor = monitored
    assert _raw(monitor, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert _raw(monitor, big).startswith(b"HTTP/1.1 431 ")
    assert _raw(monitor, b"PUT / HTTP/1.1\r\nHost: localhost\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert get(monitor.url + "nope")[0] == 404
    # keep-alive: two requests on one connection
    both = _raw(
        monitor,
        b"GET /api/state HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /api/state HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert both.count(b"HTTP/1.1 200 OK") == 2


_HOST = b"Host: localhost\r\n"
_MANY_FIELDS = "&".join(f"f{i}=1" for i in range(17)).encode()

MALFORMED = {
    "content-length with a sign": (
        b"POST /login HTTP/1.1\r\n" + _HOST + b"Content-Length: +12\r\n\r\ntoken=abcdef",
        400,
    ),
    "content-length with an underscore": (
        b"POST /login HTTP/1.1\r\n" + _HOST + b"Content-Length: 1_1\r\n\r\ntoken=abcde",
        400,
    ),
    "two different content-lengths": (
        b"POST /login HTTP/1.1\r\n" + _HOST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n",
        400,
    ),
    "space before the colon": (b"GET /api/state HTTP/1.1\r\nHost : localhost\r\n\r\n", 400),
    "obs-fold continuation line": (
        b"GET /api/state HTTP/1.1\r\n" + _HOST + b"X-Note: a\r\n  folded\r\n\r\n",
        400,
    ),
    "folded first header": (b"GET / HTTP/1.1\r\n Host: localhost\r\n\r\n", 400),
    "HTTP/1.9": (b"GET / HTTP/1.9\r\n" + _HOST + b"\r\n", 505),
    "HTTP/2.0 in a 1.x head": (b"GET / HTTP/2.0\r\n" + _HOST + b"\r\n", 505),
    "17 query fields": (b"GET /api/state?%s HTTP/1.1\r\n%s\r\n" % (_MANY_FIELDS, _HOST), 400),
    "17 query fields on the page": (b"GET /?%s HTTP/1.1\r\n%s\r\n" % (_MANY_FIELDS, _HOST), 400),
    "17 form fields": (
        b"POST /login HTTP/1.1\r\n"
        + _HOST
        + b"Content-Length: %d\r\n\r\n" % len(_MANY_FIELDS)
        + _MANY_FIELDS,
        400,
    ),
    "transfer-encoding and content-length": (
        b"POST /login HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two host headers": (b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n", 400),
    "no host header on HTTP/1.1": (b"GET /api/state HTTP/1.1\r\n\r\n", 400),
    "body larger than allowed": (
        b"POST /login HTTP/1.1\r\n" + _HOST + b"Content-Length: 100000\r\n\r\n",
        413,
    ),
    "chunked body larger than allowed": (
        b"POST /login HTTP/1.1\r\n"
        + _HOST
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + (b"1000\r\n" + b"a" * 4096 + b"\r\n") * 2
        + b"0\r\n\r\n",
        413,
    ),
    "not a request line": (b"NONSENSE\r\n\r\n", 400),
    "cut short": (b"GET /api/state HTTP/1.1\r\nHost: loc", 400),
    "head too large": (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("request_bytes, status", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_requests_are_refused(
    request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with Host(port=0, token="s3cret") as host:
        monitor = Monitor(host, port=0).start()
        try:
            answer = _raw(monitor, request_bytes)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
            assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]
            # The monitor still serves (a refusal ends one connection only).
            assert get(monitor.url, {})[0] == 200
        finally:
            monitor.close()  # joins the thread: everything it logged is in caplog now
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert loud == [], [r.getMessage() for r in loud]
    assert not any(r.exc_info for r in caplog.records)


_TOKENS = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"HEAD",
        b"/",
        b"/api/state",
        b"/frame?s=1&c=x",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/1.9",
        b"Host:",
        b"localhost",
        b"Content-Length:",
        b"12",
        b"+1",
        b"Transfer-Encoding:",
        b"chunked",
        b" ",
        b"\t",
        b":",
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"\x00",
        b"\xff",
        b"0\r\n\r\n",
        b"token=s3cret",
    ]
)
_REQUESTS = st.one_of(
    st.binary(max_size=200),
    st.lists(_TOKENS, max_size=30).map(b"".join),
    st.lists(_TOKENS, max_size=30).map(lambda parts: b"GET / HTTP/1.1\r\n" + b"".join(parts)),
)


@pytest.fixture
def shared_monitor() -> Iterator[Monitor]:
    # One monitor for all of a test's hypothesis examples (the fixture is created once
    # per test function); function scope so that it is gone before the next test.
    host = Host(port=0, token="s3cret")
    monitor = Monitor(host, port=0).start()
    yield monitor
    monitor.close()
    host.close()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_REQUESTS)
def test_any_bytes_get_an_http_answer_or_a_quiet_close(
    shared_monitor: Monitor, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    answer = _raw(shared_monitor, data)
    if answer:
        status = int(answer[9:12])
        assert answer.startswith(b"HTTP/1.1 ") and 200 <= status < 600, answer[:100]
        assert status < 500 or status in (501, 505), answer[:200]  # refused, never failed
    else:  # nothing but blank lines was sent: nothing to answer
        assert not data.strip(b"\r\n"), data
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_pipelined_and_http_1_0_requests(monitored: Tuple[Host, Monitor]) -> None:
    _, monitor = monitored
    answer = _raw(monitor, b"GET /api/state HTTP/1.0\r\nHost: localhost\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and json.loads(body)["clients"] == []
    # A form body, then a pipelined request in the same packet.
    both = _raw(
        monitor,
        b"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\ntoken=x"
        b"GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    assert both.startswith(b"HTTP/1.1 204 ") and b"HTTP/1.1 404 Not Found" in both
    head = _raw(monitor, b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")  # no body


def test_connections_are_capped(monitored: Tuple[Host, Monitor]) -> None:
    _, monitor = monitored
    idle: List[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", monitor.port), timeout=TIMEOUT))

        def refused() -> bool:
            return _raw(monitor, b"GET /api/state HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503")

        poll(refused, what="a 503 beyond MAX_CONNECTIONS")
    finally:
        for s in idle:
            s.close()
    poll(lambda: get(monitor.url + "api/state")[0] == 200, what="service after the flood")


def test_close_joins_the_thread_and_frees_the_port() -> None:
    host = Host(port=0)
    monitor = Monitor(host, port=0).start()
    port = monitor.port
    assert any(t.name == "socketengine-monitor" for t in threading.enumerate())
    monitor.close()
    monitor.close()  # idempotent
    assert not any(t.name.startswith("socketengine-monitor") for t in threading.enumerate())
    with Monitor(host, port=port) as again:  # the port is free again
        assert get(again.url)[0] == 200
    host.close()
    with pytest.raises(RuntimeError):
        monitor.start()


def test_close_ends_live_streams_promptly() -> None:
    host = Host(port=0)
    monitor = Monitor(host, port=0).start()
    stream = http.client.HTTPConnection("127.0.0.1", monitor.port, timeout=TIMEOUT)
    idle = socket.create_connection(("127.0.0.1", monitor.port), timeout=TIMEOUT)
    try:
        stream.request("GET", "/events")
        response = stream.getresponse()
        assert response.readline().startswith(b"retry:")
        t0 = time.monotonic()
        monitor.close()
        assert time.monotonic() - t0 < 3.0
        assert response.read() is not None  # the stream ends (EOF), nothing hangs
    finally:
        stream.close()
        idle.close()
        host.close()
    assert not any(t.name.startswith("socketengine-monitor") for t in threading.enumerate())


def test_bind_failure_names_the_address() -> None:
    with Host(port=0) as host, Monitor(host, port=0) as first:
        with pytest.raises(OSError, match=f"cannot serve the monitor on 127.0.0.1:{first.port}"):
            Monitor(host, port=first.port).start()
    with pytest.raises(ValueError):
        Monitor(None, port=70000)


def test_https_with_a_tls_context(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "c")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    with Host(port=0) as host, Monitor(host, port=0, tls=server, token="t0k") as monitor:
        assert monitor.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        request = urllib.request.Request(
            monitor.url + "api/state", headers={"Authorization": "Bearer t0k"}
        )
        with urllib.request.urlopen(request, context=ctx, timeout=10) as r:
            assert json.loads(r.read())["clients"] == []
        login = urllib.request.Request(monitor.url + "login", data=b"token=t0k")
        with urllib.request.urlopen(login, context=ctx, timeout=10) as r:
            attributes = [a.strip() for a in r.headers["Set-Cookie"].split(";")]
        assert r.status == 204 and "Secure" in attributes and "HttpOnly" in attributes


def test_host_monitor_parameter() -> None:
    host: Any = Host(port=0, monitor=0)
    try:
        monitor = host.monitor
        assert isinstance(monitor, Monitor) and monitor.port > 0
        assert get(monitor.url + "api/state")[0] == 200
    finally:
        host.close()
    assert not any(t.name.startswith("socketengine-monitor") for t in threading.enumerate())


def test_host_forwards_bgr_to_its_monitor() -> None:
    host: Any = Host(port=0, monitor=0, monitor_bgr=True)
    try:
        assert host.monitor.bgr is True
    finally:
        host.close()


def test_an_asyncio_host_serves_its_own_monitor() -> None:
    import asyncio

    from socketengine import aio

    async def main() -> None:
        async with aio.Host(port=0, monitor=0, monitor_bgr=True) as h:
            assert h.monitor is not None and h.monitor.bgr is True
            async with aio.Client(port=h.port, name="cam") as c:
                await c.write("pose", [1, 2])
                for _ in range(200):  # bounded: the value arrives within 2 s
                    if h.get("pose") is not None:
                        break
                    await asyncio.sleep(0.01)
                loop = asyncio.get_running_loop()
                status, _, body = await loop.run_in_executor(None, get, h.monitor.url + "api/state")
                assert status == 200 and b"cam" in body
        assert h.monitor is None

    asyncio.run(main())
    assert not any(t.name.startswith("socketengine-monitor") for t in threading.enumerate())


def test_received_at_moves_when_an_unchanged_value_is_sent_again() -> None:
    with Host(port=0) as h, Client(port=h.port) as c:
        c.write("flag", True)
        wait_for(lambda: h.get("flag") is True)
        (conn,) = h.clients()
        first = conn.received_at["flag"]
        c.write("other", 1)
        c.write("flag", True)  # the same object again: only the stamp shows it arrived
        wait_for(lambda: conn.received_at["flag"] > first, what="a newer stamp")


def test_monitor_serves_an_asyncio_host_through_the_interface() -> None:
    """The monitor reads only the documented interface (state.py), which the asyncio
    host has too: its clients, values and frames show up like a threaded host's."""
    import asyncio

    from socketengine import aio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(TIMEOUT)

    async def make() -> Any:
        h = aio.Host(port=0)
        await h.start()
        return h

    async def values() -> List[Any]:
        return [dict(c.values) for c in host.clients()]

    host = on_loop(make())
    try:
        with Client(port=host.port, name="to-aio") as c:
            c.write("mode", "async")
            c.write_image(np.full((8, 8, 3), 7, np.uint8))
            poll(lambda: any("image" in v for v in on_loop(values())), what="the values")
            # No client comes or goes while the monitor reads (the asyncio host's
            # clients() is not meant for other threads yet).
            with Monitor(host, port=0, image_format="png") as monitor:
                doc = state(monitor)
                assert channel_text(doc, "to-aio", "mode") == '"async"'
                assert doc["host"]["port"] == host.port and doc["host"]["open"] is True
                (image,) = doc["images"]
                status, headers, _ = get(f"{monitor.url}frame?s={image['session']}&c=image")
                assert status == 200 and headers["X-Frame-Shape"] == "8x8x3"
    finally:
        on_loop(host.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


# -- the page in a real browser -------------------------------------------------------------


def _chromium() -> Optional[str]:
    for candidate in (
        os.environ.get("SOCKETENGINE_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/lib/chromium/chromium",
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _missing(reason: str) -> None:
    """Skip -- or fail, where SOCKETENGINE_REQUIRE_BROWSER=1 (CI) says it must run."""
    if os.environ.get("SOCKETENGINE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SOCKETENGINE_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright import sync_api
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    executable = _chromium()
    if executable is None:
        _missing("Chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def _frame(top_left: Tuple[int, int, int], bottom_right: Tuple[int, int, int]) -> Any:
    """A 120x160 RGB test picture: a smooth gradient with two flat coloured squares."""
    y, x = np.mgrid[0:120, 0:160]
    img = np.dstack([x * 255 // 159, y * 255 // 119, np.full_like(x, 96)]).astype(np.uint8)
    img[10:50, 10:60] = top_left
    img[70:110, 100:150] = bottom_right
    return img


_READ_CANVAS = """(sel) => {
  const c = document.querySelector(sel);
  if (!c || !c.dataset.seq) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  return {w: c.width, h: c.height, seq: Number(c.dataset.seq), data: Array.from(d)};
}"""


def _canvas_pixels(page: Any, selector: str) -> Optional[Tuple[int, Any]]:
    got = page.evaluate(_READ_CANVAS, selector)
    if got is None:
        return None
    rgba = np.array(got["data"], dtype=np.uint8).reshape(got["h"], got["w"], 4)
    return got["seq"], rgba[:, :, :3]


def _matches(shown: Any, sent: Any) -> bool:
    if shown.shape != sent.shape:
        return False
    diff = np.abs(shown.astype(int) - sent.astype(int))
    # JPEG is lossy: small errors overall, and the flat squares' centres nearly exact.
    return bool(
        diff.mean() < 4 and diff[20:40, 20:50].max() <= 12 and diff[80:100, 110:140].max() <= 12
    )


def _text(page: Any, selector: str) -> Optional[str]:
    element = page.query_selector(selector)
    return None if element is None else element.inner_text()


def test_browser_shows_clients_values_and_live_video(browser: Any, tmp_path: Path) -> None:
    frame_a = _frame((230, 40, 40), (40, 200, 60))
    frame_b = _frame((30, 60, 220), (250, 220, 30))
    with Host(port=0) as host, Monitor(host, port=0) as monitor:
        with (
            Client(port=host.port, name="cam-1") as cam,
            Client(port=host.port, name="robot-arm") as arm,
            Client(port=host.port, name="sensor") as sensor,
        ):
            cam.write_image(frame_a)
            cam.write("exposure_ms", 8.5)
            arm.write("pose", {"x": 1.5, "y": -0.25, "z": 0.8, "tags": ("arm", "left")})
            arm.write("status", "ready")
            sensor.write("temps", np.array([21.5, 22.0, 21.75], np.float32))
            sensor.write("log", "calibration done; " * 12)
            poll(lambda: host.get("log") is not None and host.get("image") is not None)

            context = browser.new_context(viewport={"width": 1120, "height": 780})
            page = context.new_page()
            errors: List[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            try:
                page.goto(monitor.url)
                arm_card = 'article.client[data-name="robot-arm"]'
                poll(lambda: "robot-arm" in (_text(page, arm_card) or ""), what="client card")
                status = f'{arm_card} tr[data-channel="status"] td.value'
                poll(lambda: _text(page, status) == '"ready"', what="status ready")
                arm.write("status", "moving")
                poll(lambda: _text(page, status) == '"moving"', what="status to change")

                canvas = 'figure.video[data-channel="image"] canvas'
                seq_a, shown = poll(lambda: _canvas_pixels(page, canvas), what="first frame")
                assert _matches(shown, frame_a), np.abs(shown.astype(int) - frame_a).mean()
                cam.write_image(frame_b)
                poll(
                    lambda: (
                        (got := _canvas_pixels(page, canvas))
                        and got[0] > seq_a
                        and _matches(got[1], frame_b)
                    ),
                    what="the new frame on the canvas",
                )
                assert "cam-1" in (_text(page, "figure.video figcaption") or "")
                poll(lambda: "live" in (_text(page, "#status") or ""), what="live status")
                shot = tmp_path / "monitor.png"
                page.screenshot(path=str(shot))
                target = os.environ.get("SOCKETENGINE_MONITOR_SCREENSHOT")
                if target:
                    Path(target).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(shot, target)
                assert errors == []
            finally:
                context.close()


def test_browser_page_fits_a_phone(browser: Any, monitored: Tuple[Host, Monitor]) -> None:
    host, monitor = monitored
    with Client(port=host.port, name="a-client-with-a-rather-long-name-for-a-phone") as c:
        c.write("long", "word" * 200)
        c.write("nested", {"k": list(range(50))})
        context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
        page = context.new_page()
        try:
            page.goto(monitor.url)
            poll(lambda: page.query_selector('tr[data-channel="nested"]'), what="values")
            width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert width[0] <= width[1], width
        finally:
            context.close()


def test_browser_asks_for_the_token(browser: Any) -> None:
    with Host(port=0, token="s3cret") as host, Monitor(host, port=0) as monitor:
        with Client(port=host.port, name="secret-client", token="s3cret"):
            context = browser.new_context()
            page = context.new_page()
            try:
                page.goto(monitor.url)
                poll(lambda: page.is_visible("#login"), what="the token form")
                assert page.query_selector('article.client[data-name="secret-client"]') is None
                page.fill("#token", "wrong")
                page.click("#login button")
                poll(lambda: _text(page, "#login-error") == "Wrong token.", what="refusal")
                page.fill("#token", "s3cret")
                page.click("#login button")
                poll(
                    lambda: page.query_selector('article.client[data-name="secret-client"]'),
                    what="the client after login",
                )
                assert not page.is_visible("#login")
            finally:
                context.close()


def _age(text: Optional[str]) -> float:
    """Seconds from the page's age text ("0.4 s", "12 s", "3 min")."""
    assert text, text
    number, unit = text.split()
    return float(number) * {"s": 1, "min": 60, "h": 3600, "d": 86400}[unit]


def test_browser_value_table_has_headers_and_both_ages(
    browser: Any, monitored: Tuple[Host, Monitor]
) -> None:
    host, monitor = monitored
    with Client(port=host.port, name="pulse") as c:
        c.write("heartbeat", "alive")
        c.write("mode", "auto")
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(monitor.url)
            card = 'article.client[data-name="pulse"]'
            poll(lambda: page.query_selector(f'{card} tr[data-channel="mode"]'), what="rows")
            headers = page.eval_on_selector_all(
                f"{card} table.values thead th", "ths => ths.map(t => t.textContent)"
            )
            assert headers == ["channel", "value", "updated", "changed"]
            row = f'{card} tr[data-channel="heartbeat"]'

            def resent_but_unchanged() -> bool:
                c.write("heartbeat", "alive")  # the same value again, as a heartbeat does
                updated = _age(_text(page, f"{row} td.updated"))
                changed = _age(_text(page, f"{row} td.changed"))
                return changed - updated >= 1.5

            poll(resent_but_unchanged, what="'updated' to stay fresh while 'changed' ages")
            assert _text(page, f"{row} td.value") == '"alive"'
            mode = f'{card} tr[data-channel="mode"]'
            assert _age(_text(page, f"{mode} td.updated")) >= 1.0  # not re-sent: both age
            assert "received at" in (page.get_attribute(f"{row} td.updated", "title") or "")
        finally:
            context.close()
