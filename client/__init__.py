"""Python client for mgstream: live streams over WebSocket (async and blocking) and the command line."""

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
