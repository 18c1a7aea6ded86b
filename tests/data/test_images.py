"""images: trailers after the end of the image, real truncation, odd files, and the reduced gray decode."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from kfer.data.images import (
    ImageError,
    check_complete,
    check_header,
    claimed_size,
    decode_gray,
    decode_image,
    read_header,
)
from kfer.demo.hostile import BOMB_SIDE, bmp_header, bomb_jpeg, bomb_png
from tests.helpers import face_cropper


def _photo(w=640, h=480, seed=0) -> np.ndarray:
    """A smooth, textured RGB picture (JPEG-friendly, with structure to compare crops on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1).astype(np.uint8)
    for _ in range(12):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(10, 60)), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    return cv2.GaussianBlur(img, (5, 5), 0)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=92, **kw)
    return b.getvalue()


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


SAMSUNG = b"\x00" * 3 + b"SEFH" + b"\x01\x00\x00\x00" + bytes(range(200)) + b"\xff\xd9" + b"SEFT"
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + np.random.default_rng(3).bytes(4096)


@pytest.mark.parametrize("trailer", [SAMSUNG, MP4, b"\x00" * 64], ids=["samsung", "motion-photo-mp4", "zeros"])
def test_bytes_after_the_end_of_a_jpeg_are_accepted(trailer):
    arr = _photo()
    clean = _jpeg(arr)
    data = clean + trailer
    assert check_complete(data) == len(trailer)
    assert np.array_equal(decode_image(data), decode_image(clean))
    assert np.array_equal(decode_gray(data, 2), decode_gray(clean, 2))


def test_bytes_after_png_iend_are_accepted():
    clean = _png(_photo(64, 48))
    assert check_complete(clean + MP4) == len(MP4)
    assert np.array_equal(decode_image(clean + MP4), decode_image(clean))


def test_progressive_jpeg_and_exif_thumbnail_are_complete():
    arr = _photo()
    prog = _jpeg(arr, progressive=True)
    assert check_complete(prog) == 0
    assert np.abs(decode_image(prog).astype(int) - decode_image(_jpeg(arr)).astype(int)).mean() < 2
    # an EXIF block holding a whole thumbnail JPEG (its own FF D9 inside the APP1 segment)
    im = Image.fromarray(arr)
    thumb = io.BytesIO()
    im.resize((80, 60)).save(thumb, "JPEG")
    exif = im.getexif()
    exif[0x0112] = 1
    data = _jpeg(arr, exif=exif.tobytes() + thumb.getvalue())
    assert check_complete(data) == 0


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_a_jpeg_cut_short_is_truncated(progressive, fraction):
    data = _jpeg(_photo(), progressive=progressive)
    cut = data[: int(len(data) * fraction)]
    with pytest.raises(ImageError) as exc:
        decode_image(cut)
    assert exc.value.reason == "truncated" and "before the end-of-image marker" in exc.value.detail
    with pytest.raises(ImageError, match="truncated"):
        decode_gray(cut, 2)


def test_a_cut_jpeg_with_a_header_only_is_truncated():
    data = _jpeg(_photo())
    with pytest.raises(ImageError) as exc:
        check_complete(data[:300])  # inside the header segments
    assert exc.value.reason == "truncated"


def test_a_png_cut_in_half_is_truncated():
    data = _png(_photo(64, 48))
    with pytest.raises(ImageError) as exc:
        decode_image(data[: len(data) // 2])
    assert exc.value.reason == "truncated" and "PNG" in exc.value.detail


def test_details_are_readable_text():
    with pytest.raises(ImageError) as exc:
        decode_image(b"plain text, not an image")
    assert exc.value.reason == "not_an_image"
    assert "BytesIO" not in exc.value.detail and "24 bytes" in exc.value.detail
    with pytest.raises(ImageError) as exc:
        decode_image(b"")
    assert exc.value.reason == "empty_file"


def test_a_one_pixel_image_is_too_small_with_its_size():
    data = _png(np.zeros((1, 1, 3), np.uint8))
    for call in (lambda c: c.crop_bytes(data, (0, 0, 1, 1)), lambda c: c.crop_main(decode_image(data))):
        with pytest.raises(ImageError) as exc:
            call(face_cropper(size=32, min_side=32))
        assert exc.value.reason == "too_small" and "1x1" in exc.value.detail


BOMBS = {"png": bomb_png, "jpeg": bomb_jpeg}


@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_a_bomb_is_refused_from_its_header_by_every_cropper_path(kind):
    """An 875 KB PNG claiming 30000×30000 came in; Pillow's DecompressionBombError escaped as a traceback."""
    data = BOMBS[kind]()
    assert len(data) < 1000 and claimed_size(data) == (BOMB_SIDE, BOMB_SIDE)
    cropper = face_cropper()  # params.yaml's crop.max_megapixels: 50
    calls = {"check_header": lambda: check_header(data, cropper.max_megapixels),
             "crop_bytes": lambda: cropper.crop_bytes(data),  # the crop stage
             "crop_bytes, annotated": lambda: cropper.crop_bytes(data, (0, 0, 100, 100)),
             "whole image": lambda: cropper.with_detector("none").crop_bytes(data),  # pre-cropped photos
             "crop_all_bytes": lambda: cropper.crop_all_bytes(data)}  # kfer predict, the served model
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning either
            with pytest.raises(ImageError) as exc:
                call()
        assert exc.value.reason == "too_many_pixels", name
        assert exc.value.detail == f"{BOMB_SIDE}x{BOMB_SIDE} = 900.0 MP > crop.max_megapixels 50", name
    # the claim is judged before anything else: the same bomb cut short is still refused for its size
    with pytest.raises(ImageError, match="too_many_pixels"):
        cropper.crop_bytes(data[: len(data) // 2])


def test_the_limit_is_inclusive_and_a_setting():
    data = _png(_photo(200, 100))  # 0.02 MP
    head = check_header(data, 0.02)
    assert (head.width, head.height) == (200, 100)
    with pytest.raises(ImageError) as exc:
        check_header(data, 0.0199)
    assert exc.value.reason == "too_many_pixels" and exc.value.detail.startswith("200x100 = 0.0 MP > ")
    with pytest.raises(ImageError, match="too_many_pixels"):
        face_cropper(max_megapixels=0.01).crop_bytes(data)
    with pytest.raises(ImageError, match="too_many_pixels"):  # decoded pixels (crop_main) are judged alike
        face_cropper(max_megapixels=0.01).crop_main(_photo(200, 100))
    # a phone photo's header is well inside the default (4032x3024 = 12.2 MP)
    assert claimed_size(bomb_jpeg(4032, 3024)) == (4032, 3024)
    check_header(bomb_jpeg(4032, 3024), face_cropper().max_megapixels)


def test_pillows_own_bomb_guard_never_surfaces():
    """Formats Pillow reads for kfer (here BMP) are judged on Pillow's header; its warning (above 89.5 MP) is
    silenced and its DecompressionBombError (above 179 MP) is the same too_many_pixels."""
    warned = bmp_header(10000, 9000)  # 90 MP: Pillow warns
    refused = bmp_header(20000, 10000)  # 200 MP: Pillow refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = read_header(warned)
        assert (head.format, head.width, head.height) == ("BMP", 10000, 9000)
        with pytest.raises(ImageError) as exc:
            check_header(warned, 50)
        assert exc.value.reason == "too_many_pixels" and exc.value.detail.startswith("10000x9000 = 90.0 MP")
        for call in (read_header, lambda d: check_header(d, 178)):
            with pytest.raises(ImageError) as exc:
                call(refused)
            assert exc.value.reason == "too_many_pixels" and "Pillow" in exc.value.detail


def _oriented_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """Store ``upright`` so that applying EXIF ``orientation`` shows it upright again."""
    stored = {1: upright, 3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    im = Image.fromarray(np.ascontiguousarray(stored))
    exif = im.getexif()
    exif[0x0112] = orientation
    return _jpeg(np.ascontiguousarray(stored), exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_reduced_gray_decode_matches_the_full_colour_crop(orientation):
    upright = _photo(1600, 1200, seed=orientation)
    data = _oriented_jpeg(upright, orientation)
    head = read_header(data)
    assert (head.width, head.height, head.orientation) == (1600, 1200, orientation)
    box = (700, 300, 1100, 800)  # in the upright frame
    cropper = face_cropper(size=96, margin=0.1, box="annotation")
    fast = cropper.crop_bytes(data, box)
    full = cropper.crop_main(decode_image(data), box)
    assert fast.reduce == 4 and full.reduce == 1  # 550 px square / 4 = 137 >= 96
    assert fast.box == full.box and fast.source == full.source == "annotation"
    assert np.abs(fast.image.astype(int) - full.image.astype(int)).mean() <= 2.0
    # and the box really is in the upright frame: the crop equals the crop of the upright original
    ref = cropper.crop_main(cv2.cvtColor(upright, cv2.COLOR_RGB2BGR), box)
    assert np.abs(fast.image.astype(int) - ref.image.astype(int)).mean() <= 3.0


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_decode_of_rotated_photos_whose_sides_are_not_multiples_of_8(orientation):
    upright = _photo(1443, 1083, seed=10 + orientation)  # 1440x1083-class phone photos: 1083 = 135·8 + 3
    data = _oriented_jpeg(upright, orientation)
    box = (600, 350, 1000, 800)
    cropper = face_cropper(size=48, margin=0.1, box="annotation")
    fast, full = cropper.crop_bytes(data, box), cropper.crop_main(decode_image(data), box)
    assert fast.reduce == 8
    assert np.abs(fast.image.astype(int) - full.image.astype(int)).mean() <= 1.0


def test_reduction_keeps_the_face_at_least_the_output_size():
    c = face_cropper(size=224)
    assert [c.reduction(s) for s in (223, 224, 447, 448, 900, 1792, 5000)] == [1, 1, 1, 2, 4, 8, 8]


def test_pre_cropped_faces_use_the_whole_image():
    face = _photo(48, 48)
    c = face_cropper(size=64, detector="none", min_side=32)
    got = c.crop_bytes(_png(face))
    assert got.source == "whole_image" and got.box == (0, 0, 48, 48) and got.image.shape == (64, 64)
    wide = c.crop_bytes(_png(_photo(80, 40)))
    assert wide.box == (20, 0, 60, 40)  # non-square: the centred square
    with pytest.raises(ValueError, match="unknown detector"):
        face_cropper(detector="mtcnn")
