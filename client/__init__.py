"""Python client for mgstream: live streams over WebSocket (async and blocking), batch jobs over HTTP."""

from client.batch import BatchClient, BatchError, JobFailed
from client.streaming import (
    Reconnect,
    Reconnected,
    Stream,
    StreamClosed,
    StreamError,
    StreamRefused,
    connect,
    http_base_url,
    stream_url,
)
from client.sync import SyncStream
from client.sync import connect as connect_sync

__all__ = [
    "BatchClient",
    "BatchError",
    "JobFailed",
    "Reconnect",
    "Reconnected",
    "Stream",
    "StreamClosed",
    "StreamError",
    "StreamRefused",
    "SyncStream",
    "connect",
    "connect_sync",
    "http_base_url",
    "stream_url",
]
