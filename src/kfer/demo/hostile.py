"""Hostile photos for the tests and the benchmarks: files whose header claims far more pixels than they hold
(decompression bombs), which kfer must refuse before decoding (``crop.max_megapixels``,
:func:`kfer.data.images.check_header`)."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

BOMB_SIDE = 30000  # the bombs below claim BOMB_SIDE × BOMB_SIDE pixels (900 MP)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A complete, valid-looking 8-bit gray PNG whose IHDR claims ``width``×``height``: a few hundred bytes of
    compressed rows (a decoder would run out of data, or first allocate ``width``·``height`` bytes)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)  # 4 rows of zeros, filter byte 0
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def bomb_jpeg(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim ``width``×``height`` (each at most 65535)."""
    data = bytearray(cv2.imencode(".jpg", np.full((48, 64, 3), 128, np.uint8))[1].tobytes())
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise RuntimeError("OpenCV wrote a JPEG without a baseline frame header (SOF0)")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def bmp_header(width: int, height: int) -> bytes:
    """The 54-byte header of a 24-bit BMP claiming ``width``×``height``, without its pixels (Pillow opens it
    lazily: the size is known, nothing decoded)."""
    return (struct.pack("<2sIHHI", b"BM", 54 + width * height * 3, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, width * height * 3, 2835, 2835, 0, 0))
