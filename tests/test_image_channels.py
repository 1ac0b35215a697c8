"""Images through the endpoints: codecs, defaults, get_jpeg, stats, conflation."""

import numpy as np
import pytest
from conftest import wait_for

from socketengine import Client, Host, images

# Arrays and images: over the socket and over shared memory (conftest.transfer).
pytestmark = pytest.mark.usefixtures("transfer")

_BACKENDS = images.available_backends()
needs_jpeg = pytest.mark.skipif(not _BACKENDS.get("jpeg"), reason="no JPEG backend installed")
needs_png = pytest.mark.skipif(not _BACKENDS.get("png"), reason="no PNG backend installed")


def _frame(h: int = 240, w: int = 320) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 200  # channel 0 bright ("B" for OpenCV users)
    img[..., 1] = (x * 255 // w).astype(np.uint8)
    img[..., 2] = 30  # channel 2 dark
    img[..., 1] ^= (y % 2).astype(np.uint8)
    return img


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@needs_jpeg
def test_jpeg_round_trip_keeps_shape_dtype_and_channel_order(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    frame = _frame()
    c.write_image(frame, codec="jpeg", quality=90)
    wait_for(lambda: host.get("image") is not None)
    got = host.get("image")
    assert got.shape == frame.shape and got.dtype == np.uint8
    assert _psnr(got, frame) > 30
    assert got[..., 0].mean() > 150 and got[..., 2].mean() < 80  # BGR stays BGR
    jpeg = host.get_jpeg("image")
    assert jpeg is not None and jpeg[:2] == b"\xff\xd8"
    assert host.get_all("image")[0].shape == frame.shape
    assert host.get("image") is host.get("image")  # decoded once, then cached


@needs_png
def test_png_is_exact_for_uint16_and_gray(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    depth = (np.arange(120 * 160, dtype=np.uint16) * 3).reshape(120, 160)
    c.write_image(depth, channel="depth", codec="png")
    gray = _frame()[..., 1].copy()
    c.write_image(gray, channel="gray", codec="png")
    wait_for(lambda: host.get("depth") is not None and host.get("gray") is not None)
    assert host.get("depth").dtype == np.uint16 and np.array_equal(host.get("depth"), depth)
    assert host.get("gray").ndim == 2 and np.array_equal(host.get("gray"), gray)


@needs_jpeg
def test_seed_writeimg_uses_the_endpoint_default_codec() -> None:
    with (
        Host(port=0, image_codec="jpeg", image_quality=80) as h,
        Client(port=h.port, image_codec="jpeg", image_quality=85) as c,
    ):
        frame = _frame()
        c.writeImg(frame)
        wait_for(lambda: h.get_jpeg() is not None)
        assert _psnr(h.get("image"), frame) > 28
        wait_for(lambda: h.clients())
        h.writeImg_ALL(frame)
        wait_for(lambda: c.get_jpeg() is not None)
        assert c.get("image").shape == frame.shape
        assert c.stats()["images"]["sent"]["image"]["codec"] == "jpeg"


@needs_jpeg
def test_write_image_all_encodes_once(monkeypatch, host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    clients = [make_client() for _ in range(3)]
    wait_for(lambda: len(host.clients()) == 3)
    calls = []
    real = images.encode

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(images.codecs, "encode", counting)
    assert host.write_image_all(_frame(), codec="jpeg") == 3
    assert len(calls) == 1
    for c in clients:
        wait_for(lambda c=c: c.get("image") is not None)
        assert c.get("image").shape == (240, 320, 3)


@needs_jpeg
def test_callbacks_subscriptions_and_wait_get_decoded_arrays(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    seen: list = []
    host.on("cam", lambda data, conn: seen.append(data))
    sub = host.subscribe("cam")
    c = make_client()
    c.write_image(_frame(), channel="cam", codec="jpeg")
    data, _ = sub.get(timeout=10)
    assert isinstance(data, np.ndarray) and data.shape == (240, 320, 3)
    wait_for(lambda: seen)
    assert isinstance(seen[0], np.ndarray)


def test_refused_images_raise_before_sending(host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    c = make_client()
    with pytest.raises(TypeError, match="uint8"):
        c.write_image(np.zeros((4, 4, 3), np.float32), codec="jpeg")
    with pytest.raises(ValueError):
        c.write_image(np.zeros((4, 4, 4), np.uint8), codec="jpeg")
    with pytest.raises(ValueError, match="codec"):
        c.write_image(_frame(), codec="gif")
    with pytest.raises(TypeError):
        c.write_image("not an image")
    with pytest.raises(ValueError):
        Client(port=host.port, image_quality=0, open=False)
    c.write("after", 1)
    wait_for(lambda: host.get("after") == 1)
    assert host.get("image") is None


def test_missing_codec_names_the_extra(monkeypatch, host: Host, make_client) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(images.codecs, "_load", lambda backend: None)
    c = make_client()
    with pytest.raises(ImportError, match=r"socket\.engine\[jpeg\]"):
        c.write_image(_frame(), codec="jpeg")


def test_stats_count_conflated_frames_on_both_sides() -> None:
    with Host(port=0) as h, Client(port=h.port) as c:
        wait_for(lambda: h.clients())
        c._conn.pause_reading()  # a receiver that does not keep up
        frame = _frame(480, 640)
        for i in range(40):
            frame = frame.copy()
            frame[0, 0, 0] = i
            h.write_image_all(frame, codec="raw")
        sent = h.stats()["images"]["sent"]["image"]
        assert sent["frames"] == 40 and sent["dropped"] > 0
        assert sent["delivered"] + sent["dropped"] + sent["pending"] == 40
        c._conn.resume_reading()
        wait_for(lambda: c.get("image") is not None and c.get("image")[0, 0, 0] == 39)
        received = c.stats()["images"]["received"]["image"]
        assert received["frames"] >= 1 and received["delivered"] >= 1
        assert received["bytes"] > 0
        assert "clients" in h.stats()
