"""Say *why* an uploaded video cannot be opened, from its container bytes.

OpenCV only reports "cannot open". Users need to know whether they sent something that is not a
video, an MP4 cut short (its index comes last), a video with no frames, or a codec this server
lacks. Only consulted after OpenCV failed, so a wrong guess here never rejects a good file.
"""

from __future__ import annotations

import struct
from pathlib import Path

from service.jobs.inputs import InputError, UnsupportedInput

MAX_BOXES = 10_000


def _mp4_boxes(path: Path, size: int) -> tuple[list[tuple[bytes, int, int]], tuple[bytes, int] | None]:
    """Top-level (type, offset, size) boxes, and the (type, offset) of one that runs past the end."""
    boxes = []
    with path.open("rb") as f:
        offset = 0
        while offset + 8 <= size and len(boxes) < MAX_BOXES:
            f.seek(offset)
            head = f.read(16)
            box_size, typ = struct.unpack(">I4s", head[:8])
            if box_size == 1 and len(head) >= 16:
                box_size = struct.unpack(">Q", head[8:16])[0]
            elif box_size == 0:  # runs to the end of the file
                box_size = size - offset
            if box_size < 8:
                break
            if offset + box_size > size:
                return boxes, (typ, offset)
            boxes.append((typ, offset, box_size))
            offset += box_size
    return boxes, None


def _codec_tag(path: Path, marker: bytes, skip: int, limit: int = 8 * 2**20) -> str:
    """The 4-byte tag ``skip`` bytes after ``marker`` in the first ``limit`` bytes, or ''."""
    with path.open("rb") as f:
        data = f.read(limit)
    i = data.find(marker)
    if i < 0 or i + skip + 4 > len(data):
        return ""
    tag = data[i + skip : i + skip + 4]
    return tag.decode("latin-1") if tag.isascii() and tag.decode("latin-1").isprintable() else tag.hex()


def diagnose(path: Path, filename: str) -> InputError | None:
    """A precise error for a file OpenCV could not open, or None when the bytes give no better reason."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if head[4:8] == b"ftyp":
        boxes, overrun = _mp4_boxes(path, size)
        if overrun is not None:
            typ, at = overrun
            return InputError(
                f"{filename} is a truncated MP4: the file ends inside its '{typ.decode('latin-1')}' box "
                f"(at byte {at} of {size}); the upload was cut short or the recording was never finalised"
            )
        types = {t for t, _, _ in boxes}
        if b"moov" not in types:
            return InputError(f"{filename} is an MP4 without its index (moov box): truncated or never finalised")
        if not any(t == b"mdat" and s > 16 for t, _, s in boxes):
            return InputError(f"{filename} contains no video frames (zero-frame MP4)")
        codec = _codec_tag(path, b"stsd", 16)
        return UnsupportedInput(f"{filename}: its video codec '{codec or 'unknown'}' cannot be decoded by this server")
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        codec = _codec_tag(path, b"vids", 4)  # strh: fccType "vids", then the codec FourCC
        return UnsupportedInput(
            f"{filename}: an AVI whose video codec '{codec or 'unknown'}' cannot be decoded by this server"
        )
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return InputError(f"{filename} is a Matroska/WebM file that cannot be decoded: truncated or unsupported codec")
    preview = head[:8].hex()
    return InputError(f"{filename} is not a video: its content matches no known container (starts with {preview})")
