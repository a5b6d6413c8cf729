"""Prometheus metrics of one app instance, on its own registry (several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_MS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge("mgstream_sessions_active", "Open streaming sessions", registry=r)
        self.rejections = Counter("mgstream_rejections_total", "Refused streams", ["reason"], registry=r)
        self.frames = Counter("mgstream_frames_total", "Media frames received", registry=r)
        self.frames_dropped = Counter("mgstream_frames_dropped_total", "Frames not processed", ["reason"], registry=r)
        self.errors = Counter("mgstream_errors_total", "Errors by kind", ["kind"], registry=r)
        self.events = Counter("mgstream_events_total", "Events sent", ["type"], registry=r)
        self.queue_depth = Gauge("mgstream_scheduler_queue_depth", "Requests waiting for a batch", registry=r)
        self.runtime_up = Gauge("mgstream_runtime_up", "1 while the model runtime is healthy", registry=r)
        self.batch_size = Histogram("mgstream_batch_size", "Requests per batch", buckets=_BATCH, registry=r)
        self.queue_wait = Histogram("mgstream_queue_wait_seconds", "Submit to batch start", buckets=_MS, registry=r)
        self.inference = Histogram("mgstream_inference_seconds", "One batch in the runtime", buckets=_MS, registry=r)
        self.featurize = Histogram("mgstream_featurize_seconds", "One message featurized", buckets=_MS, registry=r)
        self.coalesced = Histogram(
            "mgstream_keypoint_transform_streams",
            "Streams served by one coalesced keypoint-transform call",
            buckets=_BATCH,
            registry=r,
        )
        self.loop_lag = Histogram(
            "mgstream_event_loop_lag_seconds",
            "How late a 100 ms timer fired on the event loop",
            buckets=_MS,
            registry=r,
        )
        self.frame_to_event = Histogram(
            "mgstream_frame_to_event_seconds",
            "Arrival of the frame that completed a window to its event sent",
            buckets=_MS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
