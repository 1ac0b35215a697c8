"""images: validation, JPEG/PNG round trips per backend, ext 5 on the wire, stats.

Sans-I/O: no sockets.  Backends that are not installed are skipped (the suite needs at
least one of them for the round trips); missing backends are simulated by replacing
``images.codecs._load``, the one place backends are looked up.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from socketengine import codec, frames, images
from socketengine.images import CodecUnavailable, EncodedImage, ImageStats

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INSTALLED = images.available_backends()


def backends(codec_name: str) -> List[Any]:
    """Every backend of ``codec_name``, skipped when it is not installed."""
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name not in INSTALLED[codec_name], reason=f"{name} is not installed"
            ),
        )
        for name in images._PREFERENCE[codec_name]
    ]


JPEG_BACKENDS = backends("jpeg")
PNG_BACKENDS = backends("png")
needs_jpeg = pytest.mark.skipif(not INSTALLED["jpeg"], reason="no JPEG backend installed")
needs_png = pytest.mark.skipif(not INSTALLED["png"], reason="no PNG backend installed")
needs_cv2 = pytest.mark.skipif("opencv" not in INSTALLED["png"], reason="OpenCV not installed")
needs_pillow = pytest.mark.skipif("pillow" not in INSTALLED["png"], reason="Pillow not installed")


# -- helpers ---------------------------------------------------------------------------------


def smooth(h: int = 96, w: int = 128, c: Optional[int] = 3, dtype: Any = np.uint8) -> np.ndarray:
    """A smooth test picture (gradients, a disc) whose channels all differ."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    planes = [
        0.5 + 0.4 * np.sin(x / 17.0) * np.cos(y / 23.0),
        0.5 + 0.45 * np.sin((x + y) / 31.0),
        0.2 + 0.6 * (x / w),
        0.9 - 0.5 * (y / h),
    ]
    disc = (x - w / 3) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 5) ** 2
    top = float(np.iinfo(dtype).max)
    out = np.stack(planes, axis=-1)
    out[disc] = [0.1, 0.8, 0.4, 0.6]
    n = 1 if c is None else c
    arr = np.round(out[..., :n] * top).astype(dtype)
    return arr[..., 0] if c is None else arr


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    peak = float(np.iinfo(a.dtype).max)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def wire(value: Any) -> Any:
    """Send ``value`` through a DATA frame and a FrameDecoder; return what arrives."""
    parts = frames.encode_value_frame(frames.DATA, "image", value, flags=frames.FLAG_IMAGE)
    stream = frames.PREAMBLE + b"".join(bytes(memoryview(p)) for p in parts)
    got = frames.FrameDecoder().feed(stream)
    assert len(got) == 1 and got[0].flags == frames.FLAG_IMAGE
    return got[0].value()


def ext5(head: Any, data: Optional[bytes] = b"\x00" * 64) -> Tuple[bytes, Optional[bytes]]:
    """A value that is one ext-5 with payload ``msgpack(head)``: (meta, data)."""
    return msgpack.packb(msgpack.ExtType(codec.EXT_IMAGE, msgpack.packb(head))), data


SHAPES = [(None, "2-D"), (1, "HxWx1"), (3, "HxWx3")]


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", PNG_BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("c", [None, 1, 3, 4])
def test_png_round_trip_is_exact(backend: str, dtype: Any, c: Optional[int]) -> None:
    img = smooth(c=c, dtype=dtype)
    if backend == "pillow" and dtype == np.uint16 and c in (3, 4):
        with pytest.raises(CodecUnavailable, match="OpenCV"):
            images.encode(img, "png", backend=backend)
        return
    enc = images.encode(img, "png", backend=backend)
    assert (enc.codec, enc.shape, enc.dtype) == ("png", img.shape, img.dtype.str)
    assert enc.tobytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = images.decode(wire(enc), backend=backend)  # a read-only view of the frame
    assert out.shape == img.shape and out.dtype == img.dtype
    assert np.array_equal(out, img)
    assert out.flags.writeable and out.flags.c_contiguous


@needs_png
@FAST
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(np.uint8), np.dtype("<u2"), np.dtype(">u2")]),
        shape=st.one_of(
            hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
            st.tuples(st.integers(1, 24), st.integers(1, 24), st.sampled_from([1, 3, 4])),
        ),
    )
)
def test_png_round_trip_any_pixels(img: np.ndarray) -> None:
    if img.dtype.itemsize == 2 and img.ndim == 3 and img.shape[2] > 1:
        if "opencv" not in INSTALLED["png"]:
            return  # needs OpenCV (tested in test_png_round_trip_is_exact)
    out = wire(images.encode(img, "png")).decode()
    assert out.shape == img.shape and out.dtype == img.dtype  # '>u2' stays '>u2'
    assert np.array_equal(out, img)


@pytest.mark.parametrize("backend", JPEG_BACKENDS)
@pytest.mark.parametrize("c, label", SHAPES)
def test_jpeg_round_trip_within_psnr(backend: str, c: Optional[int], label: str) -> None:
    img = smooth(c=c)
    enc = images.encode(img, "jpeg", 90, backend=backend)
    assert enc.tobytes()[:2] == b"\xff\xd8" and enc.nbytes < img.nbytes / 3
    out = images.decode(wire(enc), backend=backend)  # a read-only view of the frame
    assert out.shape == img.shape, label
    assert out.dtype == np.uint8 and out.flags.writeable
    assert psnr(out, img) >= 30.0


@pytest.mark.parametrize("decoder", JPEG_BACKENDS)
@pytest.mark.parametrize("encoder", JPEG_BACKENDS)
@pytest.mark.parametrize("order", ["BGR", "RGB"])
def test_any_jpeg_backend_decodes_any_other(encoder: str, decoder: str, order: str) -> None:
    img = smooth()
    enc = images.encode(img, "jpeg", 90, order=order, backend=encoder)
    out = images.decode(enc, backend=decoder)
    assert psnr(out, img) >= 30.0


@pytest.mark.parametrize("decoder", PNG_BACKENDS)
@pytest.mark.parametrize("encoder", PNG_BACKENDS)
@pytest.mark.parametrize("order", ["BGR", "RGB"])
@pytest.mark.parametrize("c", [3, 4])
def test_any_png_backend_decodes_any_other(encoder: str, decoder: str, order: str, c: int) -> None:
    img = smooth(c=c)
    enc = images.encode(img, "png", order=order, backend=encoder)
    assert np.array_equal(images.decode(enc, backend=decoder), img)


def bgr_frame(c: int = 3) -> np.ndarray:
    """Channel 0 bright, channel 1 middle, channel 2 dark (BGR: a blue picture)."""
    img = np.empty((64, 80, c), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 230, 128, 20
    if c == 4:
        img[..., 3] = 77
    return img


def order_cases() -> List[Any]:
    cases = [("jpeg", b.values[0], 3, b.marks) for b in JPEG_BACKENDS]
    cases += [("png", b.values[0], c, b.marks) for b in PNG_BACKENDS for c in (3, 4)]
    return [pytest.param(*case[:3], marks=case[3]) for case in cases]


@pytest.mark.parametrize("codec_name, backend, c", order_cases())
@pytest.mark.parametrize("order", ["BGR", "RGB"])
def test_channel_order_is_kept(codec_name: str, backend: str, c: int, order: str) -> None:
    img = bgr_frame(c)
    enc = images.encode(img, codec_name, 90, order=order, backend=backend)
    means = images.decode(enc, backend=backend).reshape(-1, c).mean(axis=0)
    assert np.allclose(means, img[0, 0], atol=3), means


@needs_jpeg
@needs_cv2
def test_default_bgr_bytes_are_the_file_opencv_would_write() -> None:
    """get_jpeg()'s bytes of an OpenCV (BGR) frame are a correct JPEG file."""
    import cv2

    img = bgr_frame()
    enc = images.encode(img, "jpeg", 90)  # default order="BGR", whatever the backend
    assert enc.order == "BGR"
    out = cv2.imdecode(np.frombuffer(enc.tobytes(), np.uint8), cv2.IMREAD_COLOR)
    assert np.allclose(out.reshape(-1, 3).mean(axis=0), img[0, 0], atol=3)


@needs_jpeg
@needs_pillow
def test_rgb_order_bytes_are_the_file_pillow_would_write() -> None:
    import io

    from PIL import Image

    img = bgr_frame()  # here read as RGB: a red picture
    enc = images.encode(img, "jpeg", 90, order="RGB")
    with Image.open(io.BytesIO(enc.tobytes())) as pic:
        out = np.asarray(pic.convert("RGB"))
    assert np.allclose(out.reshape(-1, 3).mean(axis=0), img[0, 0], atol=3)


@needs_png
@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::2, ::3],
        lambda a: a[:, ::-1],
        lambda a: np.asfortranarray(a),
        lambda a: a[10:50, 20:70],
        lambda a: a.transpose(1, 0, 2),
    ],
    ids=["strided", "mirrored", "fortran", "crop", "transposed"],
)
@pytest.mark.parametrize("codec_name", ["png", "jpeg"])
def test_non_contiguous_images(view: Any, codec_name: str) -> None:
    if codec_name == "jpeg" and not INSTALLED["jpeg"]:
        pytest.skip("no JPEG backend")
    img = view(smooth(c=3))
    out = images.decode(images.encode(img, codec_name, 95))
    assert out.shape == img.shape
    assert psnr(out, img) >= (float("inf") if codec_name == "png" else 30.0)


@needs_png
def test_encoded_bytes_do_not_share_memory_with_the_image() -> None:
    img = smooth(c=3)
    keep = img.copy()
    enc = images.encode(img, "png")
    img[:] = 0  # the user reuses the frame buffer right after write_image returns
    assert np.array_equal(images.decode(enc), keep)


def test_raw_is_the_array_itself() -> None:
    img = smooth(c=3, dtype=np.uint16).astype(np.float32)
    assert images.prepare(img, "raw") is img
    out = wire(images.prepare(img))
    assert type(out) is np.ndarray and np.array_equal(out, img)
    assert images.decoded(out) is out
    with pytest.raises(ValueError, match="raw"):
        images.encode(img, "raw")


@needs_jpeg
def test_prepare_encodes_and_decoded_decodes() -> None:
    img = smooth(c=None)
    value = images.prepare(img, "JPG", quality=80)  # case-insensitive, jpg = jpeg
    assert type(value) is EncodedImage and value.codec == "jpeg"
    out = images.decoded(wire(value))
    assert out.shape == img.shape and psnr(out, img) >= 30.0
    assert images.decoded({"not": "an image"}) == {"not": "an image"}


@needs_jpeg
def test_quality_changes_the_size() -> None:
    img = smooth(240, 320, 3)
    small = images.encode(img, "jpeg", 20).nbytes
    big = images.encode(img, "jpeg", 95).nbytes
    assert small < big


# -- on the wire: ext 5 ----------------------------------------------------------------------


@needs_png
def test_encoded_image_in_a_frame_alone_and_inside_values() -> None:
    img = smooth(c=3)
    gray = smooth(c=None, dtype=np.uint16)
    enc = images.encode(img, "png")
    enc16 = images.encode(gray, "png", order="RGB")
    arr = np.arange(5, dtype=np.float32)  # a raw array before, sharing the data section
    got = wire({"pose": (1.5, arr), "frame": enc, "depth": [enc16]})
    assert np.array_equal(got["pose"][1], arr)
    out = got["frame"]
    assert type(out) is EncodedImage and out == enc
    assert (out.codec, out.shape, out.dtype, out.order) == ("png", img.shape, "|u1", "BGR")
    assert type(out.data) is memoryview and out.data.readonly  # a view of the frame
    assert out.tobytes() == enc.tobytes() and bytes(out) == enc.tobytes()
    assert np.array_equal(out.decode(), img)
    assert got["depth"][0].order == "RGB"
    assert np.array_equal(got["depth"][0].decode(), gray)


def test_encoder_sends_the_bytes_out_of_band_without_copying() -> None:
    data = b"\xff\xd8" + bytes(13)  # 15 bytes: padded to 16
    enc = EncodedImage("jpeg", data, (4, 6, 3), "|u1", "RGB")
    arr = np.ones(3, np.uint8)
    meta, buffers, length = codec.encode([arr, enc])
    assert length == 8 + 16
    assert buffers[2].obj is data  # the encoded bytes themselves, not a copy
    assert len(meta) < 64  # nothing but the headers in the msgpack section
    head = msgpack.unpackb(msgpack.unpackb(meta)[1].data)
    assert head == ["jpeg", [4, 6, 3], "|u1", 8, 15, "RGB"]
    got = codec.decode(meta, b"".join(bytes(memoryview(b)) for b in buffers))
    assert got[1] == enc


@needs_png
@pytest.mark.parametrize("side", [400, 700], ids=["own-buffer", "mmap"])
def test_large_encoded_images_use_the_decoders_own_buffers(side: int) -> None:
    noise = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    enc = images.encode(noise, "png")  # noise does not compress: 0.5 MB / 1.5 MB
    out = wire(enc)
    assert out.nbytes == enc.nbytes
    assert np.array_equal(out.decode(), noise)


GOOD_HEAD = ["jpeg", [4, 6, 3], "|u1", 0, 16, "BGR"]


def bad(index: int, value: Any) -> List[Any]:
    head = list(GOOD_HEAD)
    head[index] = value
    return head


@pytest.mark.parametrize(
    "head, data, message",
    [
        (GOOD_HEAD[:5], None, "6 items"),
        ({"codec": "jpeg"}, None, "6 items"),
        (7, None, "6 items"),
        (bad(0, "gif"), None, "codec"),
        (bad(0, b"jpeg"), None, "codec"),
        (bad(0, "raw"), None, "codec"),
        (bad(1, "4x6"), None, "shape"),
        (bad(1, [4]), None, "shape"),
        (bad(1, [4, 6, 3, 1]), None, "shape"),
        (bad(1, [4, 6.0, 3]), None, "shape"),
        (bad(1, [True, 6, 3]), None, "shape"),
        (bad(1, [0, 6, 3]), None, "size"),
        (bad(1, [4, -6, 3]), None, "size"),
        (bad(1, [4, 70000, 3]), None, "size"),
        (bad(1, [4, 6, 2]), None, "channels"),
        (bad(1, [4, 6, 4]), None, "channels"),  # JPEG has no alpha
        (bad(2, "<f4"), None, "dtype"),
        (bad(2, "<u2"), None, "dtype"),  # 16-bit JPEG
        (bad(2, "|O"), None, "dtype"),
        (bad(2, None), None, "dtype"),
        (bad(5, "RGBA"), None, "order"),
        (bad(5, 1), None, "order"),
        (bad(3, -8), None, "offset"),
        (bad(3, "0"), None, "offset"),
        (bad(4, 0), None, "size"),
        (bad(4, 17), None, "outside"),
        (bad(3, 8), None, "outside"),
        (bad(3, 2**64 - 1), None, "outside"),
        (GOOD_HEAD, "no data", "outside"),
    ],
)
def test_hostile_image_headers_are_refused(head: Any, data: Any, message: str) -> None:
    meta, section = ext5(head, None if data == "no data" else bytes(16))
    with pytest.raises(ValueError, match=message):
        codec.decode(meta, section)
    with pytest.raises(frames.ProtocolError):
        frames.Frame(frames.DATA, 0, "image", 0, meta, section).value()


def test_hostile_image_payload_that_is_not_msgpack() -> None:
    meta = msgpack.packb(msgpack.ExtType(codec.EXT_IMAGE, b"\xc1\xc1"))
    with pytest.raises(ValueError):
        codec.decode(meta, bytes(16))


def test_extra_header_items_are_ignored() -> None:
    """Room for later minor versions: items after the 6th are ignored."""
    meta, data = ext5([*GOOD_HEAD, "future", 1], bytes(16))
    assert codec.decode(meta, data) == EncodedImage("jpeg", bytes(16), (4, 6, 3), "|u1", "BGR")


@needs_jpeg
def test_file_header_must_match_the_declared_image() -> None:
    enc = images.encode(smooth(48, 64, 3), "jpeg")
    for shape, dtype in [((48, 60, 3), "|u1"), ((64, 48, 3), "|u1"), ((48, 64), "|u1")]:
        lie = EncodedImage("jpeg", enc.data, shape, dtype, "BGR")
        with pytest.raises(ValueError, match="does not match"):
            images.decode(lie)
    png = EncodedImage("png", enc.data, (48, 64, 3), "|u1", "BGR")
    with pytest.raises(ValueError, match="not a PNG"):
        images.decode(png)


@needs_png
def test_png_header_must_match_the_declared_dtype_and_channels() -> None:
    enc = images.encode(smooth(c=None, dtype=np.uint16), "png")
    for shape, dtype in [((96, 128), "|u1"), ((96, 128, 3), "<u2"), ((96, 128, 4), "<u2")]:
        with pytest.raises(ValueError, match="does not match"):
            images.decode(EncodedImage("png", enc.data, shape, dtype, "BGR"))
    jpeg = EncodedImage("jpeg", enc.data, (96, 128), "|u1", "BGR")
    with pytest.raises(ValueError, match="not a JPEG"):
        images.decode(jpeg)


@needs_png
def test_decompression_bombs_are_refused_before_decoding(monkeypatch: Any) -> None:
    # A 16 Kpx x 16 Kpx PNG: the declared size is checked first (nothing is allocated).
    big = EncodedImage("png", b"\x89PNG\r\n\x1a\n" + bytes(40), (16000, 16000, 4), "<u2")
    monkeypatch.setattr(images.codecs, "_choose", lambda *a: pytest.fail("decoder reached"))
    with pytest.raises(ValueError, match="max_bytes"):
        images.decode(big)
    with pytest.raises(ValueError, match="max_bytes"):
        images.decode(EncodedImage("png", b"x", (100, 100, 3), "|u1"), max_bytes=29_999)


@pytest.mark.parametrize("backend", JPEG_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_jpeg_bytes_only_raise_value_error(backend: str, data: Any) -> None:
    enc = _jpeg_sample()
    raw = bytearray(enc.tobytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(4, len(raw)))
    hostile = EncodedImage("jpeg", bytes(raw[:cut]), enc.shape, enc.dtype, enc.order)
    try:
        out = images.decode(hostile, backend=backend)
    except ValueError:
        return
    assert out.shape == enc.shape and out.dtype == np.uint8


@pytest.mark.parametrize("backend", PNG_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupt_png_bytes_only_raise_value_error(backend: str, data: Any) -> None:
    enc = _png_sample()
    raw = bytearray(enc.tobytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(8, len(raw)))
    hostile = EncodedImage("png", bytes(raw[:cut]), enc.shape, enc.dtype, enc.order)
    try:
        out = images.decode(hostile, backend=backend)
    except ValueError:
        return
    assert out.shape == enc.shape and out.dtype == np.uint8


_samples: Dict[str, EncodedImage] = {}


def _jpeg_sample() -> EncodedImage:
    if "jpeg" not in _samples:
        _samples["jpeg"] = images.encode(smooth(24, 32, 3), "jpeg", 90)
    return _samples["jpeg"]


def _png_sample() -> EncodedImage:
    if "png" not in _samples:
        _samples["png"] = images.encode(smooth(24, 32, 3), "png")
    return _samples["png"]


# -- refused images --------------------------------------------------------------------------

Z = np.zeros


@pytest.mark.parametrize(
    "img, codec_name, exc, message",
    [
        ([[1, 2], [3, 4]], "raw", TypeError, "numpy array.*builtins.list"),
        (None, "jpeg", TypeError, "numpy array.*NoneType"),
        (b"\xff\xd8\xff", "jpeg", TypeError, "numpy array.*bytes"),
        (Z((4, 4), np.float32), "jpeg", TypeError, "JPEG image must have dtype uint8, not float32"),
        (Z((4, 4), np.uint16), "jpeg", TypeError, "JPEG image must have dtype uint8, not uint16"),
        (Z((4, 4), np.int8), "jpeg", TypeError, "uint8, not int8"),
        (Z((4, 4), np.bool_), "jpeg", TypeError, "uint8, not bool"),
        (Z((4, 4), np.int16), "png", TypeError, "PNG image must have dtype uint8 or uint16, not"),
        (Z((4, 4), np.uint32), "png", TypeError, "uint8 or uint16, not uint32"),
        (Z((4, 4), np.float64), "png", TypeError, "uint8 or uint16, not float64"),
        (Z((4, 4), np.complex64), "raw", TypeError, "dtype, not complex64"),
        (Z((4, 4), object), "raw", TypeError, "dtype, not object"),
        (Z((4, 4), "U3"), "raw", TypeError, "dtype, not <U3"),
        (Z(16, np.uint8), "raw", ValueError, r"shape \(H, W\) or \(H, W, C\), not \(16,\)"),
        (Z((2, 4, 4, 3), np.uint8), "png", ValueError, r"not \(2, 4, 4, 3\) \(4-D\)"),
        (Z((4, 4, 2), np.uint8), "raw", ValueError, "1, 3, 4 channels, not 2"),
        (Z((4, 4, 2), np.uint8), "png", ValueError, "1, 3, 4 channels, not 2"),
        (Z((4, 4, 5), np.uint8), "png", ValueError, "channels, not 5"),
        (Z((4, 4, 4), np.uint8), "jpeg", ValueError, "1, 3 channels, not 4.*no alpha"),
        (Z((0, 8), np.uint8), "raw", ValueError, r"height and width > 0, not shape \(0, 8\)"),
        (Z((8, 0, 3), np.uint8), "jpeg", ValueError, "height and width > 0"),
        (Z((1, 65501), np.uint8), "jpeg", ValueError, "at most 65500 pixels"),
        (Z((65536, 1), np.uint8), "png", ValueError, "at most 65535 pixels"),
        (Z((4, 4), np.uint8), "gif", ValueError, "unknown image codec 'gif'"),
        (Z((4, 4), np.uint8), 5, TypeError, "codec must be a str"),
    ],
)
def test_refused_images_name_the_problem(
    img: Any, codec_name: Any, exc: type, message: str, monkeypatch: Any
) -> None:
    # Validation comes first: no backend is even looked up.
    monkeypatch.setattr(images.codecs, "_load", lambda name: pytest.fail("backend looked up"))
    with pytest.raises(exc, match=message):
        images.validate(img, codec_name)
    with pytest.raises(exc, match=message):
        images.prepare(img, codec_name)
    if codec_name in ("jpeg", "png"):
        with pytest.raises(exc, match=message):
            images.encode(img, codec_name)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"quality": 0}, ValueError, "quality must be from 1 to 100, not 0"),
        ({"quality": 101}, ValueError, "not 101"),
        ({"quality": 90.0}, TypeError, "quality must be an int.*float"),
        ({"quality": "90"}, TypeError, "str"),
        ({"quality": True}, TypeError, "bool"),
        ({"order": "RGBA"}, ValueError, "order must be 'BGR' or 'RGB', not 'RGBA'"),
        ({"order": "bgr"}, ValueError, "order"),
        ({"backend": "imageio"}, ValueError, "backend 'imageio' does not handle jpeg"),
    ],
)
def test_refused_options(kwargs: Dict[str, Any], exc: type, message: str) -> None:
    with pytest.raises(exc, match=message):
        images.encode(smooth(8, 8, 3), "jpeg", **kwargs)


def test_valid_images_pass_validation() -> None:
    assert images.validate(Z((2, 3), np.float64)) == "raw"
    assert images.validate(Z((2, 3, 1), np.bool_), "RAW") == "raw"
    assert images.validate(Z((2, 3, 4), np.int32), "raw") == "raw"
    assert images.validate(Z((2, 3), np.uint8), "jpg") == "jpeg"
    assert images.validate(Z((2, 3, 3), np.uint8), "jpeg") == "jpeg"
    assert images.validate(Z((2, 3, 4), ">u2"), "png") == "png"
    assert images.validate(Z((1, 65500), np.uint8), "jpeg") == "jpeg"


# -- missing backends ------------------------------------------------------------------------


def only(monkeypatch: Any, *present: str) -> None:
    """Pretend that only the ``present`` backends are installed."""
    monkeypatch.setattr(
        images.codecs, "_load", lambda name: REAL_LOAD(name) if name in present else None
    )


REAL_LOAD = images._load


def test_missing_codec_messages_name_the_extra(monkeypatch: Any) -> None:
    only(monkeypatch)
    with pytest.raises(CodecUnavailable) as info:
        images.encode(smooth(8, 8, 3), "jpeg")
    assert isinstance(info.value, ImportError)
    assert str(info.value) == (
        "JPEG needs simplejpeg, OpenCV or Pillow: pip install 'socket.engine[jpeg]'"
    )
    with pytest.raises(ImportError, match=r"PNG needs OpenCV or Pillow: .*socket\.engine\[png\]"):
        images.prepare(smooth(8, 8, 3), "png")
    with pytest.raises(CodecUnavailable, match=r"socket\.engine\[jpeg\]"):
        images.decode(EncodedImage("jpeg", _FAKE_JPEG, (2, 2), "|u1"))
    assert images.available_backends() == {"jpeg": [], "png": []}
    assert images.prepare(smooth(8, 8, 3), "raw") is not None  # raw needs nothing


# The smallest header _peek_jpeg accepts: SOI, SOF0 of a 2x2 1-component 8-bit frame.
_FAKE_JPEG = b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x02\x00\x02\x01\x01\x11\x00"


def test_jpeg_falls_back_to_opencv_then_pillow(monkeypatch: Any) -> None:
    def pretend(*present: str) -> None:  # the choice only, whatever is really installed
        monkeypatch.setattr(
            images.codecs, "_load", lambda name: object() if name in present else None
        )

    pretend("simplejpeg", "opencv", "pillow")
    assert images.backend_for("jpeg") == "simplejpeg" and images.backend_for("png") == "opencv"
    pretend("opencv", "pillow")
    assert images.backend_for("jpeg") == "opencv"
    pretend("pillow")
    assert images.backend_for("jpeg") == "pillow" and images.backend_for("png") == "pillow"
    with pytest.raises(CodecUnavailable, match="16-bit colour PNG needs OpenCV"):
        images.backend_for("png", png16_colour=True)
    pretend("simplejpeg")
    assert images.backend_for("jpeg") == "simplejpeg"
    with pytest.raises(CodecUnavailable, match="PNG needs"):
        images.backend_for("png")


@needs_pillow
def test_pillow_alone_does_jpeg_and_png(monkeypatch: Any) -> None:
    only(monkeypatch, "pillow")
    img = smooth(c=3)
    assert psnr(images.decode(images.encode(img, "jpeg")), img) >= 30.0
    assert np.array_equal(images.decode(images.encode(img, "png")), img)
    gray16 = smooth(c=None, dtype=np.uint16)
    assert np.array_equal(images.decode(images.encode(gray16, "png")), gray16)


@needs_pillow
def test_16_bit_colour_png_without_opencv_says_so(monkeypatch: Any) -> None:
    img = smooth(c=3, dtype=np.uint16)
    enc = images.encode(img, "png") if "opencv" in INSTALLED["png"] else None
    only(monkeypatch, "pillow", "simplejpeg")
    with pytest.raises(CodecUnavailable, match="16-bit colour PNG needs OpenCV"):
        images.encode(img, "png")
    if enc is not None:  # and Pillow would read it as 8-bit: refused, not degraded
        with pytest.raises(CodecUnavailable, match="opencv-python-headless"):
            images.decode(enc)


def test_explicit_backend_that_is_missing(monkeypatch: Any) -> None:
    only(monkeypatch)
    with pytest.raises(CodecUnavailable, match="'simplejpeg' is not installed"):
        images.encode(smooth(8, 8, 3), "jpeg", backend="simplejpeg")
    with pytest.raises(ValueError, match="does not handle png"):
        images.encode(smooth(8, 8, 3), "png", backend="simplejpeg")


def test_images_module_imports_no_backend_or_numpy_eagerly() -> None:
    import subprocess
    import sys

    code = (
        "import sys, socketengine, socketengine.codec, socketengine.images; "
        "print(sorted(m for m in ('numpy', 'cv2', 'PIL', 'simplejpeg') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


# -- from_bytes --------------------------------------------------------------------------------


@needs_jpeg
@pytest.mark.parametrize("c", [None, 3])
def test_from_bytes_wraps_an_existing_jpeg(c: Optional[int]) -> None:
    img = smooth(c=c)
    data = images.encode(img, "jpeg").tobytes()  # e.g. a frame of an MJPEG camera
    enc = images.from_bytes(data)
    assert (enc.codec, enc.shape, enc.dtype, enc.order) == ("jpeg", img.shape, "|u1", "BGR")
    assert enc.data is data
    assert psnr(wire(enc).decode(), img) >= 30.0


@needs_png
def test_from_bytes_wraps_an_existing_png() -> None:
    img = smooth(c=4, dtype=np.uint16 if "opencv" in INSTALLED["png"] else np.uint8)
    enc = images.from_bytes(images.encode(img, "png").data)
    assert enc.shape == img.shape and np.dtype(enc.dtype) == img.dtype
    assert np.array_equal(enc.decode(), img)


@needs_png
def test_from_bytes_accepts_any_buffer() -> None:
    img = smooth(c=3)
    data = np.frombuffer(images.encode(img, "png").tobytes(), np.uint8).reshape(-1, 1)
    assert np.array_equal(images.from_bytes(data).decode(), img)


def test_from_bytes_refuses_other_files() -> None:
    with pytest.raises(ValueError, match="not a JPEG or PNG"):
        images.from_bytes(b"GIF89a" + bytes(20))
    with pytest.raises(ValueError, match="no frame header"):
        images.from_bytes(b"\xff\xd8\xff\xd9")
    with pytest.raises(ValueError, match="components"):  # CMYK
        images.from_bytes(b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x02\x00\x02\x04\x01\x11\x00")


# -- EncodedImage ------------------------------------------------------------------------------


def test_encoded_image_basics() -> None:
    a = EncodedImage("png", b"\x89PNG-bytes", (2, 3, 4), "|u1", "RGB")
    assert a.nbytes == 10 and a.channels == 4
    assert a.tobytes() is a.data
    assert a == EncodedImage("png", memoryview(b"\x89PNG-bytes"), (2, 3, 4), "|u1", "RGB")
    assert a != EncodedImage("png", b"\x89PNG-bytes", (2, 3, 4), "|u1", "BGR")
    assert a != b"\x89PNG-bytes"
    assert repr(a) == "EncodedImage('png', 10 bytes, shape=(2, 3, 4), dtype='|u1', order='RGB')"
    with pytest.raises(TypeError):
        hash(a)
    with pytest.raises(AttributeError):
        a.extra = 1  # type: ignore[attr-defined]
    assert EncodedImage("jpeg", b"x", (2, 3), "|u1").channels == 1


@pytest.mark.parametrize(
    "args, exc, message",
    [
        (("gif", b"x", (2, 3), "|u1"), ValueError, "codec 'gif'"),
        (("jpeg", b"x", (2, 3), "<u2"), ValueError, "dtype '<u2'"),
        (("png", b"x", (2, 3), "uint8"), ValueError, "dtype 'uint8'"),
        (("png", b"x", (2, 3), "|u1", "rgb"), ValueError, "order 'rgb'"),
        (("png", b"x", (2, 3, 2), "|u1"), ValueError, "2 channels"),
        (("png", b"x", (0, 3), "|u1"), ValueError, "0x3"),
        (("png", b"x", "2x3", "|u1"), ValueError, "shape '2x3'"),
        (("png", b"x", (2, np.int64(3)), "|u1"), ValueError, "shape"),
        (("png", b"", (2, 3), "|u1"), ValueError, "no bytes"),
        (("png", "text", (2, 3), "|u1"), TypeError, "bytes-like, not str"),
    ],
)
def test_encoded_image_fields_are_checked_when_made(
    args: Tuple[Any, ...], exc: type, message: str
) -> None:
    """A hand-made image the receiver would refuse is refused by the sender already."""
    with pytest.raises(exc, match=message):
        EncodedImage(*args)


def test_encoded_image_data_may_be_any_contiguous_buffer() -> None:
    col = np.frombuffer(b"\xff\xd8" + bytes(30), np.uint8).reshape(-1, 1)  # cv2.imencode's
    enc = EncodedImage("jpeg", col, (2, 3), "|u1")
    assert enc.nbytes == 32 and memoryview(enc.data).ndim == 1
    meta, buffers, length = codec.encode(enc)
    assert length == 32 and codec.decode(meta, bytes(memoryview(buffers[0]))) == enc


# -- stats -------------------------------------------------------------------------------------


def test_stats_count_frames_deliveries_and_conflated_drops() -> None:
    s = ImageStats()
    assert s.snapshot(now=0.0) == {
        "frames": 0,
        "delivered": 0,
        "dropped": 0,
        "pending": 0,
        "bytes": 0,
        "fps": 0.0,
        "codec": None,
    }
    # A writer at 3 frames per delivery: every frame but the newest gets conflated.
    t = 100.0
    for i in range(30):
        s.record_frame("jpeg")
        if i % 3 == 2:
            s.record_dropped(2)
            s.record_delivered(1000, now=t)
            t += 0.1
    s.record_frame("png")  # one still queued
    snap = s.snapshot(now=t)
    assert snap["frames"] == 31 and snap["delivered"] == 10 and snap["dropped"] == 20
    assert snap["pending"] == 1 and snap["bytes"] == 10_000 and snap["codec"] == "png"
    assert snap["fps"] == pytest.approx(10.0, abs=0.1)


def test_stats_fps_follows_the_recent_rate() -> None:
    s = ImageStats(window=2.0)
    for i in range(300):  # 30 fps for 10 s
        s.record_delivered(now=i / 30)
    assert s.fps(now=10.0) == pytest.approx(30.0, abs=0.6)
    for i in range(50):  # then 5 fps for 10 s
        s.record_delivered(now=10.0 + i / 5)
    assert s.fps(now=20.0) == pytest.approx(5.0, abs=0.6)
    assert s.fps(now=21.0) == pytest.approx(2.5, abs=0.6)  # half the window is silent
    assert s.fps(now=22.5) == 0.0  # stopped


def test_stats_fps_early_and_saturated() -> None:
    s = ImageStats(window=2.0, max_samples=16)
    s.record_delivered(now=0.0)
    assert s.fps(now=0.0) == 0.0  # one frame is no rate
    s.record_delivered(now=0.04)
    assert s.fps(now=0.05) == pytest.approx(25.0)  # early: between the first and last
    for i in range(1000):  # 1000 fps, more than the 16 samples held cover
        s.record_delivered(now=1.0 + i / 1000)
    assert s.fps(now=2.0) == pytest.approx(1000.0, rel=0.01)
    with pytest.raises(ValueError, match="window"):
        ImageStats(window=0)


def test_stats_are_thread_safe() -> None:
    s = ImageStats()

    def work() -> None:
        for _ in range(2000):
            s.record_frame("jpeg")
            s.record_delivered(3)
            s.record_dropped()
            s.fps()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    snap = s.snapshot()
    assert (snap["frames"], snap["delivered"], snap["dropped"]) == (8000, 8000, 8000)
    assert snap["bytes"] == 24000 and snap["pending"] == 0
    assert "frames" in repr(s)


def test_a_broken_backend_counts_as_missing(monkeypatch: Any, tmp_path: Any) -> None:
    """A backend whose import fails in any way (e.g. built for another numpy) is skipped."""
    (tmp_path / "broken_jpeg_mod.py").write_text("raise ValueError('numpy.dtype size changed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(images._MODULES, "simplejpeg", "broken_jpeg_mod")
    monkeypatch.setitem(images._MODULES, "opencv", "no_such_module_anywhere")
    monkeypatch.setattr(images.codecs, "_loaded", {})
    assert images._load("simplejpeg") is None and images._load("opencv") is None
    expected = ["pillow"] if "pillow" in INSTALLED["jpeg"] else []
    assert images.available_backends()["jpeg"] == expected
