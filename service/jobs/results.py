"""Result formats of a batch job: JSON detections, the MiGA/SMG CSV, and a timeline PNG.

Frames are 0-based indices into the input (as in the live events); class ids are 1-based as in the
SMG annotation files. Every file is written atomically (temporary name, fsync, rename), so a reader
never sees half a result and a full disk leaves no debris.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.contract.classes import SMG_CLASSES


@dataclass(frozen=True)
class BatchDetection:
    class_id: int  # 1-based
    label: str
    score: float
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float

    @classmethod
    def from_event(cls, event: Any) -> BatchDetection:
        """From a ``gesture_end`` event (the same object live streams send)."""
        return cls(
            class_id=int(event.class_id),
            label=str(event.label),
            score=float(event.score),
            start_frame=int(event.start_frame),
            end_frame=int(event.end_frame),
            start_s=float(event.start_time),
            end_s=float(event.end_time),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sort_detections(dets: Iterable[BatchDetection]) -> list[BatchDetection]:
    return sorted(dets, key=lambda d: (d.start_frame, d.end_frame, d.class_id, -d.score))


# ---- JSON ----


def detections_json(dets: Sequence[BatchDetection], meta: dict[str, Any]) -> bytes:
    """``meta`` describes the input and model (job id, filename, fps, frames, model name/version)."""
    body = {**meta, "count": len(dets), "detections": [d.to_dict() for d in dets]}
    return json.dumps(body, indent=2).encode()


def read_detections_json(data: bytes | str) -> tuple[list[BatchDetection], dict[str, Any]]:
    body = json.loads(data)
    dets = [BatchDetection(**d) for d in body.pop("detections")]
    body.pop("count", None)
    return dets, body


# ---- MiGA / SMG CSV ----


def detections_csv(dets: Sequence[BatchDetection], *, video_id: str | None = None, scores: bool = False) -> bytes:
    """SMG annotation layout: one row ``label,start_frame,end_frame`` per detection, no header.

    With ``scores`` (or a ``video_id``) the variant with a header
    ``video_id,label,start_frame,end_frame,score`` is written instead, which pools several videos in one
    file and keeps the confidence for ranking metrics.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if scores or video_id is not None:
        writer.writerow(["video_id", "label", "start_frame", "end_frame", "score"])
        for d in dets:
            writer.writerow([video_id or "", d.class_id, d.start_frame, d.end_frame, f"{d.score:.4f}"])
    else:
        for d in dets:
            writer.writerow([d.class_id, d.start_frame, d.end_frame])
    return buf.getvalue().encode()


# ---- timeline PNG ----


def timeline_png(
    dets: Sequence[BatchDetection],
    *,
    duration_s: float,
    classes: Sequence[str] = SMG_CLASSES,
    title: str = "",
) -> bytes:
    """One row per class; each detection is a bar whose colour depth is its score."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    n = len(classes)
    end = max([duration_s, *(d.end_s for d in dets)]) or 1.0
    fig = Figure(figsize=(12, 1.2 + 0.32 * n), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    # Shading: low scores stay pale but never vanish (the lower quarter of the colour map is skipped).
    cmap = colors.LinearSegmentedColormap.from_list("score", matplotlib.colormaps["Blues"](np.linspace(0.25, 1, 256)))
    norm = colors.Normalize(vmin=0.0, vmax=1.0)
    for d in dets:
        row = n - d.class_id  # class 1 on top
        width = max(d.end_s - d.start_s, end / 2000)  # keep instant detections visible
        ax.broken_barh(
            [(d.start_s, width)],
            (row - 0.4, 0.8),
            facecolors=cmap(norm(d.score)),
            edgecolors="black",
            linewidth=0.3,
        )
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{i} {label}" for i, label in reversed(list(enumerate(classes, start=1)))], fontsize=8)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlim(0, end)
    ax.set_xlabel("time (s)")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    for y in range(n):
        ax.axhline(y - 0.5, color="0.9", linewidth=0.5)
    ax.set_title(title or f"{len(dets)} detections over {duration_s:.1f} s", fontsize=10)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, pad=0.01, label="score")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---- atomic writes ----

Opener = Callable[[Path], IO[bytes]]


def _default_opener(path: Path) -> IO[bytes]:
    return open(path, "wb")  # noqa: SIM115 - closed by the caller


class AtomicWriter:
    """Write-to-temp, fsync, rename. ``opener`` is injectable so tests can simulate a full disk
    through this very code path; an ``OSError`` (e.g. ENOSPC) propagates after the temp file is removed."""

    def __init__(self, opener: Opener = _default_opener) -> None:
        self.opener = opener

    def write_bytes(self, path: Path, data: bytes) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with self.opener(tmp) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def open_stream(self, path: Path) -> IO[bytes]:
        """A file for streamed writes (uploads); the caller fsyncs and renames."""
        return self.opener(Path(path))


def fsync_dir(path: Path) -> None:
    """Make a rename durable: fsync the directory holding it (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


RESULT_FILES = {"json": "result.json", "csv": "result.csv", "png": "result.png"}


def write_results(
    job_dir: Path,
    dets: Sequence[BatchDetection],
    meta: dict[str, Any],
    *,
    duration_s: float,
    classes: Sequence[str] = SMG_CLASSES,
    writer: AtomicWriter | None = None,
) -> dict[str, Path]:
    """All three formats; returns format -> path. The plain CSV is stored, the scored variant is rendered
    on request from the JSON."""
    writer = writer or AtomicWriter()
    dets = sort_detections(dets)
    title = f"{meta.get('filename', '')}: {len(dets)} detections over {duration_s:.1f} s".lstrip(": ")
    payloads = {
        "json": detections_json(dets, meta),
        "csv": detections_csv(dets),
        "png": timeline_png(dets, duration_s=duration_s, classes=classes, title=title),
    }
    out = {}
    for fmt, data in payloads.items():
        path = Path(job_dir) / RESULT_FILES[fmt]
        writer.write_bytes(path, data)
        out[fmt] = path
    return out
