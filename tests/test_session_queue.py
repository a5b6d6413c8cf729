"""The inbound queue's live policy counts frames: a message of several frames takes that much room, and
the oldest messages make way for it, every dropped frame counted."""

from __future__ import annotations

from service.streams.session import InboundFrame, StreamSession


def _session(limit: int) -> StreamSession:
    return StreamSession(inbound_frames=limit, outbound_messages=8, idle_timeout_s=30, max_session_s=60)


def _msg(seq: int, frames: int) -> InboundFrame:
    return InboundFrame(seq, seq / 30, b"", 0.0, frames)


def test_queue_limit_counts_frames_and_drops_the_oldest_messages() -> None:
    s = _session(8)
    assert [s.push_frame(_msg(0, 4)), s.push_frame(_msg(4, 4))] == [0, 0]
    assert s.queued_frames == 8
    assert s.push_frame(_msg(8, 1)) == 4  # the first message (4 frames) makes way
    assert [f.seq for f in s.inbound] == [4, 8] and s.queued_frames == 5
    assert s.push_frame(_msg(9, 20)) == 5  # bigger than the limit: taken whole, everything older dropped
    assert [f.seq for f in s.inbound] == [9] and s.queued_frames == 20
    c = s.counters
    assert (c.frames_received, c.frames_dropped) == (29, 9)
    assert s.status().lag_frames == 20


def test_taking_a_message_frees_its_frames() -> None:
    import asyncio

    s = _session(8)
    s.push_frame(_msg(0, 3))
    s.push_frame(_msg(3, 2))
    first = asyncio.run(s.next_frame())
    assert first is not None and first.seq == 0 and s.queued_frames == 2
