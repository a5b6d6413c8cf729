"""Decode and check image frames: JPEG/PNG payloads and raw arrays become 8-bit BGR (H, W, 3).

Policy, in one place:
- encoded payloads (the ``jpeg``/``png`` stream inputs) must be the declared format; a greyscale
  image is expanded to BGR and an alpha channel is dropped (not composited), 16-bit PNGs are
  scaled to 8 bit. Clients cannot always choose what their camera or canvas encodes.
- raw arrays (decoded video frames) must already be uint8 BGR (H, W, 3): anything else is a
  programming error upstream and is refused with the offending shape or dtype in the message.
- sizes are checked from the file header *before* decoding, so a small payload claiming a huge
  image (a decompression bomb) never allocates its pixels.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from service.features.base import FrameError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_SIDE = 16  # below this no landmarker or backbone can find anything
# JPEG start-of-frame markers carrying the image size (SOF0..SOF15 minus DHT/JPG/DAC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff_format(data: bytes | memoryview) -> str | None:
    """'jpeg', 'png' or None, from the magic bytes."""
    head = bytes(data[:8])
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return None


def peek_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header without decoding; FrameError if unreadable."""
    buf = bytes(data) if isinstance(data, memoryview) else data
    fmt = sniff_format(buf)
    if fmt == "png":
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            raise FrameError("corrupt PNG: header is truncated or lacks IHDR")
        width, height = struct.unpack(">II", buf[16:24])
        return width, height
    if fmt == "jpeg":
        i = 2
        while i + 4 <= len(buf):
            if buf[i] != 0xFF:
                raise FrameError(f"corrupt JPEG: expected a marker at byte {i}")
            marker = buf[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
                continue
            (length,) = struct.unpack(">H", buf[i + 2 : i + 4])
            if marker in _SOF_MARKERS:
                if i + 9 > len(buf):
                    break
                height, width = struct.unpack(">HH", buf[i + 5 : i + 9])
                return width, height
            i += 2 + length
        raise FrameError("corrupt JPEG: no frame header (SOF) found; the data is truncated or not an image")
    raise FrameError(f"payload is not a JPEG or PNG image (starts with {bytes(buf[:8]).hex()})")


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise FrameError(f"zero-size image ({width}x{height})")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise FrameError(f"image {width}x{height} is too small; each side must be at least {MIN_SIDE} px")
    if width * height > max_pixels:
        raise FrameError(
            f"image {width}x{height} has {width * height} pixels, more than the limit of {max_pixels}"
            " (MGSTREAM_MAX_IMAGE_PIXELS)"
        )


def decode_image(payload: bytes | memoryview, *, expected: str | None, max_pixels: int) -> np.ndarray:
    """A JPEG/PNG payload -> contiguous uint8 BGR (H, W, 3); FrameError naming the problem otherwise."""
    if len(payload) == 0:
        raise FrameError("empty payload: zero bytes where an image was expected")
    fmt = sniff_format(payload)
    if fmt is None:
        raise FrameError(f"payload is not a JPEG or PNG image (starts with {bytes(payload[:8]).hex()})")
    if expected is not None and fmt != expected:
        raise FrameError(f"stream declared {expected} input but this payload is a {fmt.upper()} image")
    width, height = peek_size(payload)
    check_size(width, height, max_pixels)
    image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise FrameError(f"corrupt {fmt.upper()}: OpenCV could not decode the {len(payload)}-byte payload")
    if image.shape[0] != height or image.shape[1] != width:
        raise FrameError(f"corrupt {fmt.upper()}: header says {width}x{height}, "
                         f"pixels are {image.shape[1]}x{image.shape[0]}")
    return to_bgr(image)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Greyscale/BGRA/16-bit decoded images -> uint8 BGR (the payload conversion policy)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise FrameError(f"unsupported pixel type {image.dtype}; expected 8- or 16-bit images")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise FrameError(f"unsupported image layout {image.shape}")


def check_frame(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """Validate a raw decoded frame: uint8 BGR (H, W, 3) within the size limits."""
    if not isinstance(image, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise FrameError(f"greyscale frame {image.shape}; convert to BGR first (cv2.COLOR_GRAY2BGR)")
    if image.ndim == 3 and image.shape[2] == 4:
        raise FrameError(f"4-channel (RGBA/BGRA) frame {image.shape}; drop alpha first (cv2.COLOR_BGRA2BGR)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise FrameError(f"frame must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise FrameError(f"frame must be uint8, got {image.dtype}")
    check_size(image.shape[1], image.shape[0], max_pixels)
    return np.ascontiguousarray(image)
