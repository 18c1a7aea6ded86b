"""Bytes -> pixels: integrity checks, EXIF orientation, odd modes, and fast reduced-size gray decoding.

Used by the ``crop`` stage, ``kfer predict`` and the model's pyfunc alike (through :mod:`kfer.data.faces`).
Unusable input raises :class:`ImageError`, whose ``reason`` is the skip reason the crop stage counts and whose
text is the detail it keeps.

Truncation is judged the way libjpeg and libpng judge it: the data ends before the image does (JPEG: no
end-of-image marker after the last scan; PNG: no ``IEND`` chunk after the last chunk). Bytes *after* the end
of the image are fine: Samsung phones append a ``SEFH…SEFT`` trailer after ``FF D9`` and Motion Photos append
a whole video, and every decoder reads those photos. The JPEG marker walk skips the entropy-coded data with
one regular-expression search per scan (C speed, about 0.4 ms per MB of photo).

Size is judged before any pixel is decoded (:func:`check_header`): a file whose header claims more than
``crop.max_megapixels`` is ``too_many_pixels`` (an 875 KB PNG can claim 30000×30000 pixels, which a decoder would
try to allocate: 2.7 GB in colour). The JPEG frame header and the PNG ``IHDR`` are read here without Pillow, so the
claim is judged even where Pillow would refuse to open the file; other formats are judged from Pillow's header.
Pillow's own guard (``Image.MAX_IMAGE_PIXELS``: a warning above 89.5 MP, ``DecompressionBombError`` above
179 MP) never surfaces: its warning is silenced (the limit is judged here) and its error is the same
``too_many_pixels``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A marker inside entropy-coded data: 0xFF followed by neither 0x00 (stuffing), RST0-7 nor 0xFF (a fill byte:
# the match then starts at the last 0xFF). A plain character class: ~0.4 ms per MB, no backtracking.
_SCAN_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
# start-of-frame markers (baseline, progressive, lossless, arithmetic): the frame header holds the size. Not
# DHT (C4), JPG (C8) or DAC (CC), which share the range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
REDUCED_GRAY = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class ImageError(Exception):
    """An input image that cannot be used; ``reason`` is a short machine-readable cause, ``detail`` the why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _not_an_image(data: bytes) -> ImageError:
    return ImageError("not_an_image", f"no known image format ({len(data)} bytes, starts {data[:8]!r})")


@contextlib.contextmanager
def _pillow_guard():
    """Pillow's decompression-bomb guard as kfer's: its warning silenced (:func:`check_header` judges the size
    against ``crop.max_megapixels``), its error ``ImageError("too_many_pixels")``."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except Image.DecompressionBombError as exc:
            raise ImageError("too_many_pixels", f"Pillow refuses to open it: {exc}") from exc


# --- structure --------------------------------------------------------------------------------------------

def _next_marker(data: bytes, pos: int) -> tuple[int, int] | None:
    """(the next JPEG marker at or after ``pos``, the offset just past it), or None when the data ends first.
    Garbage between segments is skipped, as libjpeg skips it with a warning, and so are fill bytes (0xFF runs)."""
    pos = data.find(b"\xff", pos)
    if pos < 0:
        return None
    n = len(data)
    while pos < n and data[pos] == 0xFF:
        pos += 1
    return (data[pos], pos + 1) if pos < n else None


def _jpeg_end(data: bytes) -> int:
    """Offset just past the JPEG's end-of-image marker; ImageError("truncated") when the data stops first."""
    n, pos = len(data), 2
    while (found := _next_marker(data, pos)) is not None:
        marker, pos = found
        if marker == 0xD9:
            return pos
        if marker in _STANDALONE or marker == 0xD8:
            continue
        if pos + 2 > n:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            raise ImageError("truncated", f"JPEG segment 0x{marker:02X} at byte {pos - 2} runs past the end "
                                          f"of the file ({n} bytes)")
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            m = _SCAN_MARKER.search(data, pos)
            if m is None:
                raise ImageError("truncated", f"JPEG scan data stops at byte {n} before the end-of-image marker")
            pos = m.start()  # the marker's 0xFF
    raise ImageError("truncated", f"JPEG data stops at byte {n} before the end-of-image marker")


def _png_end(data: bytes) -> int:
    """Offset just past the PNG's IEND chunk; ImageError("truncated") when the data stops first."""
    n, pos = len(data), len(PNG_SIGNATURE)
    while pos + 8 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length  # length, type, data, CRC
        if end > n:
            raise ImageError("truncated", f"PNG chunk {kind!r} at byte {pos} runs past the end of the file "
                                          f"({n} bytes)")
        if kind == b"IEND":
            return end
        pos = end
    raise ImageError("truncated", f"PNG data stops at byte {n} before the IEND chunk")


def check_complete(data: bytes) -> int:
    """Raise ImageError("empty_file" / "truncated") for data that stops before its image does.

    Returns how many bytes follow the image (a phone's trailer, a Motion Photo's video); 0 for formats that
    are not walked (their decoders judge them).
    """
    if not data:
        raise ImageError("empty_file", "0 bytes")
    if data[:2] == JPEG_SOI:
        return len(data) - _jpeg_end(data)
    if data[:8] == PNG_SIGNATURE:
        return len(data) - _png_end(data)
    return 0


def claimed_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as a JPEG's frame header (SOFn) or a PNG's ``IHDR`` states them, read without Pillow
    and without decoding; None for other formats and for a header cut short (later checks judge those)."""
    if data[:8] == PNG_SIGNATURE:
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if data[:2] != JPEG_SOI:
        return None
    n, pos = len(data), 2
    while (found := _next_marker(data, pos)) is not None:  # up to the frame header, which comes before any scan
        marker, pos = found
        if marker in _STANDALONE or marker == 0xD8:
            continue
        if marker in (0xD9, 0xDA) or pos + 2 > n:  # end of image, or a scan before any frame header
            return None
        if marker in _SOF:  # length (2), precision (1), height (2), width (2)
            if pos + 7 > n:
                return None
            return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 3:pos + 5], "big")
        pos += int.from_bytes(data[pos:pos + 2], "big")
    return None


def check_pixels(width: int, height: int, max_megapixels: float) -> None:
    """ImageError("too_many_pixels") when a ``width``×``height`` image is over ``max_megapixels``
    (``crop.max_megapixels``)."""
    if width * height > max_megapixels * 1e6:
        raise ImageError("too_many_pixels", f"{width}x{height} = {width * height / 1e6:.1f} MP > "
                                            f"crop.max_megapixels {max_megapixels:g}")


@dataclass(frozen=True)
class Header:
    """What the file header says, without decoding pixels."""

    format: str  # PIL's format name: JPEG, PNG, ...
    width: int  # upright (EXIF orientation applied)
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent


def read_header(data: bytes) -> Header:
    """Format, upright size and EXIF orientation from the header (PIL opens lazily: no pixels decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_guard(), Image.open(io.BytesIO(data)) as im:
            w, h, fmt = im.width, im.height, im.format or "?"
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
                orientation = 1
    except UnidentifiedImageError as exc:
        raise _not_an_image(data) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt", f"header unreadable: {exc}") from exc
    if orientation in ROTATED_ORIENTATIONS:
        w, h = h, w
    return Header(fmt, w, h, orientation if 1 <= orientation <= 8 else 1)


def check_header(data: bytes, max_megapixels: float) -> Header:
    """Every check a photo passes before any pixel is decoded, in order: the size its header claims (JPEG, PNG:
    read without Pillow; ``too_many_pixels``), completeness (:func:`check_complete`), the header
    (:func:`read_header`) and, for other formats, the size Pillow reads from it. Returns the header."""
    claimed = claimed_size(data)
    if claimed is not None:
        check_pixels(*claimed, max_megapixels)
    check_complete(data)
    head = read_header(data)
    check_pixels(head.width, head.height, max_megapixels)
    return head


# --- decoding ---------------------------------------------------------------------------------------------

def _decode_with_pil(data: bytes) -> np.ndarray:
    """Fallback for what OpenCV cannot decode (odd TIFF/float modes...). Returns BGR uint8."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _pillow_guard():
            im = Image.open(io.BytesIO(data))
            im.load()  # strict: a truncated file raises
    except UnidentifiedImageError as exc:
        raise _not_an_image(data) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageError(reason, str(exc)) from exc
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float64)
            lo, hi = float(a.min()), float(a.max())
            a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
            gray = np.round(a).astype(np.uint8)
            return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
        rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for exotic modes
        raise ImageError("unsupported_mode", f"{im.mode}: {exc}") from exc
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _imdecode(data: bytes, flags: dict[int, int], reduce: int, checked: bool) -> np.ndarray | None:
    """OpenCV's decode with ``flags[reduce]`` for a JPEG (``flags[1]`` otherwise); None when it cannot."""
    if not checked:
        check_complete(data)
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags[reduce if data[:2] == JPEG_SOI else 1])


def decode_image(data: bytes, reduce: int = 1, checked: bool = False) -> np.ndarray:
    """Bytes -> BGR uint8 (EXIF orientation applied). 16-bit, palette, alpha, gray and CMYK are converted.

    ``reduce``: a JPEG is decoded at 1/``reduce`` resolution (as :func:`decode_gray`); other formats, and
    photos only PIL can read, come back at full size (callers compare the shape). ``checked``: the caller
    already ran :func:`check_complete`.
    """
    img = _imdecode(data, REDUCED_COLOR, reduce, checked)
    if img is None:
        img = _decode_with_pil(data)
    if img.ndim != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageError("unsupported_mode", f"decoded to shape {img.shape}")
    return img


def decode_gray(data: bytes, reduce: int = 1, checked: bool = False) -> np.ndarray:
    """Bytes -> gray uint8, EXIF orientation applied; JPEGs at 1/``reduce`` resolution (libjpeg DCT scaling).

    A reduced JPEG is ``ceil(width / reduce)`` × ``ceil(height / reduce)``; pixel (x, y) covers source pixels
    ``reduce·x … reduce·x + reduce - 1`` of the stored frame, so a box maps by dividing by ``reduce`` (after
    :func:`kfer.data.faces.reduced_origin`'s shift where the EXIF orientation reverses an axis). Other formats ignore
    ``reduce`` (their decoders would decode full size and resize anyway). Gray is libjpeg's luma channel for
    JPEGs, which matches BGR -> gray of the colour decode to a fraction of a grey level. ``checked``: the caller
    already ran :func:`check_complete`.
    """
    img = _imdecode(data, REDUCED_GRAY, reduce, checked)
    if img is None:  # odd modes: the colour fallback, then gray
        img = cv2.cvtColor(_decode_with_pil(data), cv2.COLOR_BGR2GRAY)
    if img.ndim != 2 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ImageError("unsupported_mode", f"decoded to shape {img.shape}")
    return img


def read_bytes(path: str | os.PathLike) -> bytes:
    """A photo's bytes; ImageError("unreadable") with the OS's reason. Works with Korean (non-ASCII) paths."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageError("unreadable", f"{exc.strerror or exc}") from exc


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a photo from disk as BGR uint8 (EXIF orientation applied)."""
    return decode_image(read_bytes(path))
