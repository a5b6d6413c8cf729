"""Logging to stdout, one format for the app and uvicorn; every record carries the stream it belongs to.

The current stream id lives in a contextvar (set by the WebSocket handler), so log lines from the
handler's tasks name their stream without passing it around. Health, readiness and metrics probes
are kept out of the access log.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config

stream_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("stream_id", default="-")

_QUIET_PATHS = ("/healthz", "/readyz", "/metrics")


class StreamIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.stream_id = stream_id_var.get()
        return True


class ProbeAccessFilter(logging.Filter):
    """Drops uvicorn access lines for probe endpoints (they arrive every few seconds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        path = args[2] if isinstance(args, tuple) and len(args) >= 3 else ""
        return not (isinstance(path, str) and path.split("?", 1)[0] in _QUIET_PATHS)


def logging_config(level: str = "info") -> dict:
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"stream": {"()": StreamIdFilter}, "probes": {"()": ProbeAccessFilter}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)-7s %(name)s [%(stream_id)s] %(message)s"},
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "plain",
                "filters": ["stream"],
            },
            "access": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "plain",
                "filters": ["stream", "probes"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": level, "propagate": False},
            "uvicorn.error": {"handlers": ["stdout"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["stdout"], "level": level},
    }


def setup_logging(level: str = "info") -> None:
    logging.config.dictConfig(logging_config(level))
