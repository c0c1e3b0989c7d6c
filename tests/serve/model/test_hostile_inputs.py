"""Malformed and unusual uploads, made at test time, through the whole app.

A public endpoint gets every kind of broken file. Each must get a 200 or one of the 4xx
answers below, never a 5xx, and the app must score a good photo right after:

    400 empty          no bytes, or a multipart body with nothing in it
    400 undecodable    an image whose data is damaged or truncated
    400 (Falcon)       a multipart body that cannot be parsed, or without exactly one 'file'
    413 too_large      a body over --max-upload-bytes
    415 unsupported    not one of JPEG, PNG, WebP, GIF, BMP, TIFF (ICO, SVG, HTML, text, ...)
    422 too_many_pixels  width x height over --max-image-pixels, whatever the file size
"""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageStat

from serve.model.decode import decode
from serve.model.errors import TooManyPixels
from serve.model.preprocess import apply_steps
from tests.support.paths import car_photos
from tests.support.uploads import encode, multipart

T = Image.Transpose


@pytest.fixture(scope="module")
def upright() -> Image.Image:
    # Sides that are multiples of 16 keep JPEG's blocks aligned under every rotation; near the
    # model's input size, so that upscaling does not magnify JPEG's noise into the answer.
    return Image.open(car_photos()[0]).convert("RGB").resize((384, 288))


@pytest.fixture(scope="module")
def good_jpeg(upright) -> bytes:
    return encode(upright, "JPEG", quality=90)


@pytest.fixture(autouse=True)
def still_healthy(client, good_jpeg):
    """After every hostile request, the same app must still answer a good photo."""
    yield
    assert client.simulate_get("/healthz").json == {"status": "alive"}
    resp = client.simulate_post("/predict", body=good_jpeg, headers={"Content-Type": "image/jpeg"})
    assert resp.status_code == 200, resp.text


def post(client, body: bytes, content_type: str = "image/jpeg"):
    # Every class, not the top five: comparing two answers must not hinge on near-ties at rank 5.
    classes = len(client.simulate_get("/metadata").json["classes"])
    resp = client.simulate_post("/predict", body=body, headers={"Content-Type": content_type},
                                params={"top_k": str(classes)})
    assert resp.status_code < 500, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp


def probabilities(resp) -> dict[str, float]:
    assert resp.status_code == 200, resp.text
    return {p["label"]: p["probability"] for p in resp.json["predictions"]}


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for an RGB image of any size, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def corrupt_entropy_data(jpeg: bytes) -> bytes:
    """Overwrite every 7th byte after the start of scan: the Huffman-coded data turns to noise."""
    data = bytearray(jpeg)
    start = data.index(b"\xff\xda") + 20
    rng = random.Random(7)
    for i in range(start, len(data) - 2, 7):
        data[i] = rng.randrange(256)
    return bytes(data)


# --- bodies that are not images at all -------------------------------------------------------

@pytest.mark.parametrize("body, status, code", [
    (b"", 400, "empty"),
    (b"\xff", 415, "unsupported_type"),
    (b"<html><body><script>alert(1)</script></body></html>", 415, "unsupported_type"),
    (b"just some text, no pixels here\n", 415, "unsupported_type"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
     b'<rect width="10" height="10"/></svg>', 415, "unsupported_type"),
], ids=["zero-bytes", "one-byte", "html", "text", "svg"])
def test_non_images_sent_as_jpeg(client, body, status, code):
    resp = post(client, body)
    assert (resp.status_code, resp.json["code"]) == (status, code)


def test_ico_is_refused_before_any_decoder_runs(client, upright):
    resp = post(client, encode(upright, "ICO"), "image/jpeg")
    assert resp.status_code == 415 and "image/png" in resp.headers["Accept-Post"]


# --- damaged images -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_images(client, upright, fmt, keep):
    data = encode(upright, fmt)
    resp = post(client, data[: int(len(data) * keep)])
    assert resp.status_code == 400 and resp.json["code"] == "undecodable", (fmt, keep, resp.text)


@pytest.mark.parametrize("fmt, media", [("JPEG", "jpeg"), ("PNG", "png"), ("GIF", "gif"), ("TIFF", "tiff")])
def test_header_cut_short_is_a_damaged_image_not_a_foreign_type(client, upright, fmt, media):
    # 40 bytes hold the signature and part of the header: a damaged file of a known type.
    resp = post(client, encode(upright, fmt)[:40], f"image/{media}")
    assert resp.status_code == 400 and resp.json["code"] == "undecodable", resp.text


def test_jpeg_with_corrupt_entropy_data(client, good_jpeg):
    # libjpeg may give up (400) or decode noise (200); either is an answer, a 5xx is not.
    resp = post(client, corrupt_entropy_data(good_jpeg))
    assert resp.status_code in (200, 400)
    if resp.status_code == 400:
        assert resp.json["code"] == "undecodable"


def test_png_with_bad_checksum(client, upright):
    data = bytearray(encode(upright, "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    resp = post(client, bytes(data), "image/png")
    assert resp.status_code == 400 and resp.json["code"] == "undecodable"


# --- valid images in unusual shapes and modes -----------------------------------------------

def test_progressive_jpeg_scores_like_baseline(client, upright):
    baseline = probabilities(post(client, encode(upright, "JPEG", quality=95)))
    progressive = probabilities(post(client, encode(upright, "JPEG", quality=95, progressive=True)))
    assert baseline.keys() == progressive.keys()
    assert max(abs(baseline[k] - progressive[k]) for k in baseline) < 0.02


def test_cmyk_jpeg(client, upright):
    probabilities(post(client, encode(upright.convert("CMYK"), "JPEG")))


def test_sixteen_bit_png_is_scaled_not_clipped(client):
    # Grey level v stored as v * 257 must come back as v, not as 255 (clipped).
    levels = bytes(range(0, 256, 4)) * 32
    grey = Image.frombytes("L", (64, 32), levels)
    sixteen = Image.frombytes("I;16", grey.size, bytes(b for v in levels for b in (v, v)))
    data = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert decode(data, 10**6).tobytes() == grey.convert("RGB").tobytes()
    probabilities(post(client, data, "image/png"))


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "1", "L"])
def test_png_modes(client, upright, mode):
    image = upright.convert(mode)
    params = {"transparency": 0} if mode == "P" else {}
    data = encode(image, "PNG", **params)
    if mode == "P":
        assert "transparency" in Image.open(io.BytesIO(data)).info
    probabilities(post(client, data, "image/png"))


@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1), (2, 3)], ids=str)
def test_extreme_shapes(client, size):
    image = Image.new("RGB", size, (200, 30, 30))
    probabilities(post(client, encode(image, "PNG"), "image/png"))


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "WEBP"])
def test_other_accepted_formats(client, upright, fmt):
    probabilities(post(client, encode(upright, fmt), f"image/{fmt.lower()}"))


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("WEBP", {"lossless": True})], ids=["gif", "webp"])
def test_animation_scores_its_first_frame(client, upright, fmt, params):
    second = Image.new("RGB", upright.size, (255, 0, 0))
    animated = encode(upright, fmt, save_all=True, append_images=[second], duration=100, loop=0, **params)
    still = encode(upright, fmt, **params)
    opened = Image.open(io.BytesIO(animated))
    assert opened.n_frames == 2
    first = decode(animated, 10**6)
    assert first.tobytes() == decode(still, 10**6).tobytes()
    opened.seek(1)
    assert opened.convert("RGB").tobytes() != first.tobytes()  # so scoring frame 2 would show
    assert probabilities(post(client, animated, f"image/{fmt.lower()}")) == pytest.approx(
        probabilities(post(client, still, f"image/{fmt.lower()}")), abs=1e-5)


# --- EXIF orientation -----------------------------------------------------------------------

# How to store the upright photo so that a viewer honouring each orientation tag shows it upright.
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_orientation_is_applied(client, upright, orientation):
    transpose = STORED_AS[orientation]
    stored = upright if transpose is None else upright.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", quality=95, exif=exif)
    reference = encode(upright, "JPEG", quality=95)

    decoded = decode(data, 10**6)
    assert decoded.size == upright.size
    assert mean_abs_diff(decoded, decode(reference, 10**6)) < 2  # JPEG noise only
    if transpose is not None:
        # Ignoring the tag would give a visibly different picture: the check above can fail.
        ignored = Image.open(io.BytesIO(data)).convert("RGB")
        assert ignored.size != upright.size or mean_abs_diff(ignored, decoded) > 20

    got, want = probabilities(post(client, data)), probabilities(post(client, reference))
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 0.03


# --- sizes ----------------------------------------------------------------------------------

def test_png_header_claiming_50000_squared_is_422(client):
    resp = post(client, png_claiming(50000, 50000), "image/png")
    assert resp.status_code == 422 and resp.json["code"] == "too_many_pixels"


def test_gif_header_just_over_the_pixel_limit_is_422(client, config):
    # GIF headers carry no checksum: 2100 x 2000 claimed with a few bytes of data.
    image = encode(Image.new("P", (4, 4)), "GIF")
    data = image[:6] + struct.pack("<HH", 2100, 2000) + image[10:]
    assert 2100 * 2000 > config.max_image_pixels
    resp = post(client, data, "image/gif")
    assert resp.status_code == 422 and resp.json["code"] == "too_many_pixels"


def test_padding_resize_refuses_a_huge_canvas():
    # With a "pad" manifest a 1 x 20000 strip would need a 20000 x 20000 canvas first.
    step = {"op": "resize", "method": "pad", "height": 64, "width": 64, "resample": "bilinear",
            "pad_mode": "zeros"}
    with pytest.raises(TooManyPixels):
        apply_steps(Image.new("RGB", (1, 20000)), [step], max_pixels=4_000_000)
    assert apply_steps(Image.new("RGB", (30, 20)), [step], max_pixels=4_000_000).size == (64, 64)


# --- multipart ------------------------------------------------------------------------------

def test_multipart_without_file_field(client, good_jpeg):
    data, content_type = multipart([("image", "car.jpg", good_jpeg, "image/jpeg")])
    resp = post(client, data, content_type)
    assert resp.status_code == 400 and resp.json["code"] == "multipart_file"


def test_multipart_with_two_files(client, good_jpeg):
    data, content_type = multipart([("file", "a.jpg", good_jpeg, "image/jpeg"),
                                    ("file", "b.jpg", good_jpeg, "image/jpeg")])
    resp = post(client, data, content_type)
    assert resp.status_code == 400 and "got 2" in resp.json["description"]


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=other", "multipart/form-data"])
def test_multipart_with_wrong_or_missing_boundary(client, good_jpeg, content_type):
    data, _ = multipart([("file", "a.jpg", good_jpeg, "image/jpeg")], boundary="right")
    assert post(client, data, content_type).status_code == 400


def test_multipart_with_empty_body(client):
    for length in (None, "0"):
        headers = {"Content-Type": "multipart/form-data; boundary=x"}
        if length is not None:
            headers["Content-Length"] = length
        resp = client.simulate_post("/predict", body=b"", headers=headers)
        assert resp.status_code == 400 and resp.json["code"] == "empty", resp.text


def test_multipart_part_headers_that_are_not_utf8(client, good_jpeg):
    data, content_type = multipart([("file", "a.jpg", good_jpeg, "image/jpeg")])
    broken = data.replace(b'name="file"', b'name="fi\xfcle"', 1)
    resp = post(client, broken, content_type)
    assert resp.status_code == 400 and "UTF-8" in resp.json["description"]


def test_multipart_truncated_and_too_many_parts(client, good_jpeg):
    data, content_type = multipart([("file", "a.jpg", good_jpeg, "image/jpeg")])
    assert post(client, data[: len(data) // 2], content_type).status_code == 400
    fields = [(f"f{i}", None, b"x", "text/plain") for i in range(20)] + [("file", "a.jpg", good_jpeg, "image/jpeg")]
    data, content_type = multipart(fields)
    assert post(client, data, content_type).status_code == 400


def test_mutated_multipart_bodies(client, upright):
    """A seeded mutation loop over a valid form: flipped, cut and inserted bytes, mostly in the headers."""
    tiny = encode(upright.resize((24, 18)), "JPEG", quality=60)
    data, content_type = multipart([("note", None, b"hello", "text/plain"), ("file", "car.jpg", tiny, "image/jpeg")])
    rng = random.Random(2024)
    statuses = set()
    for _ in range(150):
        body = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(200) if rng.random() < 0.7 else rng.randrange(len(body))
            action = rng.random()
            if action < 0.5:
                body[at:at + 1] = bytes([rng.randrange(256)])
            elif action < 0.75:
                del body[at:at + rng.randint(1, 40)]
            else:
                body[at:at] = rng.randbytes(rng.randint(1, 16))
        statuses.add(post(client, bytes(body), content_type).status_code)
    assert statuses <= {200, 400, 413, 415, 422}
    assert 200 in statuses and 400 in statuses  # the mutations reached both sides
