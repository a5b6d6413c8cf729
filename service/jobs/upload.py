"""Stream a multipart upload straight to a temporary file, enforcing the size cap as bytes arrive.

The body is never held in memory, and a file over the cap is refused after at most ``max_bytes`` were
written. The file part is the one named ``file``; small text fields (e.g. ``video_id``) are kept.
The caller fsyncs and renames the file into a job directory only once everything checks out, so
a partial upload never becomes a job.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header

from service.jobs.results import AtomicWriter

FILE_FIELD = "file"
MAX_FIELD_BYTES = 4096
MAX_FILENAME = 255


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    path: Path
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _safe_filename(raw: str) -> str:
    # Keep only the base name: the client's directories mean nothing here and must not be trusted.
    name = os.path.basename(raw.replace("\\", "/")).strip()
    return name[:MAX_FILENAME]


class _Sink:
    """Callbacks for the streaming parser: route the file part to disk, keep small fields."""

    def __init__(self, tmp_dir: Path, max_bytes: int, writer: AtomicWriter) -> None:
        self.tmp_dir, self.max_bytes, self.writer = tmp_dir, max_bytes, writer
        self.fields: dict[str, str] = {}
        self.file: IO[bytes] | None = None
        self.path: Path | None = None
        self.filename: str | None = None
        self.size = 0
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self._to_file = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value, self._to_file = {}, None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if self._name == FILE_FIELD:
            if self.file is not None:
                raise UploadError(400, "only one 'file' part may be uploaded")
            self.filename = _safe_filename(filename.decode("utf-8", "replace")) if filename else ""
            self.path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
            self.file = self.writer.open_stream(self.path)
            self._to_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._to_file:
            assert self.file is not None
            self.size += end - start
            if self.size > self.max_bytes:
                raise UploadError(413, f"upload exceeds the limit of {self.max_bytes / 2**20:g} MiB")
            self.file.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise UploadError(413, f"form field '{self._name}' exceeds {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if not self._to_file and self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
        self._to_file = False

    def close(self, *, keep: bool) -> None:
        if self.file is not None:
            try:
                if keep:
                    self.file.flush()
                    os.fsync(self.file.fileno())
            finally:
                self.file.close()
                self.file = None
        if not keep and self.path is not None:
            self.path.unlink(missing_ok=True)


async def receive_upload(
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    content_length: str | None,
    tmp_dir: Path,
    max_bytes: int,
    writer: AtomicWriter | None = None,
) -> Upload:
    """Parse ``multipart/form-data`` from ``chunks`` into ``tmp_dir``; the file is fsynced on return."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, "send the file as multipart/form-data with a part named 'file'")
    # A declared length far over the cap is refused before a byte is read (multipart adds a little overhead).
    if content_length and content_length.isdigit() and int(content_length) > max_bytes + 64 * 1024:
        raise UploadError(413, f"upload of {int(content_length)} bytes exceeds the limit of {max_bytes / 2**20:g} MiB")
    sink = _Sink(tmp_dir, max_bytes, writer or AtomicWriter())
    parser = MultipartParser(params[b"boundary"], sink.callbacks())
    ok = False
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
        if sink.file is None or sink.path is None:
            raise UploadError(400, "the form has no part named 'file'")
        if sink.size == 0:
            raise UploadError(400, "the uploaded file is empty")
        # fsync off the loop: on a slow disk it can take a while.
        await asyncio.to_thread(sink.close, keep=True)
        ok = True
        return Upload(sink.path, sink.filename or "", sink.size, sink.fields)
    except UploadError:
        raise
    except OSError:
        raise
    except Exception as exc:  # the parser's errors: a malformed body
        raise UploadError(400, f"malformed multipart body: {exc}") from exc
    finally:
        if not ok:
            sink.close(keep=False)
