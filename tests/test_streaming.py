"""ReplyStream going on in the messages an interrupted try of the same reply left."""

from __future__ import annotations

from bot.streaming import ReplyStream
from tests.auxil.sinks import RecordingSink

WORDS = "one two three four five six seven eight nine ten eleven twelve"


def left_by_an_earlier_try(*ids: str, limit: int = 16) -> RecordingSink:
    sink = RecordingSink(limit=limit, fail_unknown_edits=True)
    sink.messages.update({message_id: "half writ" for message_id in ids})
    return sink


async def stream(sink: RecordingSink, text: str, continue_in: list[str]) -> tuple[
        list[str], list[list[str]]]:
    noted: list[list[str]] = []

    async def on_send(ids: list[str]) -> None:
        noted.append(ids)

    reply = ReplyStream(sink, interval=0.0, clock=lambda: 0.0, continue_in=continue_in,
                        on_send=on_send)
    for word in text.split(" "):
        await reply.push(word + " ")
    return await reply.finish(), noted


async def test_a_longer_reply_fills_the_old_messages_then_sends_new_ones() -> None:
    sink = left_by_an_earlier_try("old-1", "old-2")
    ids, noted = await stream(sink, WORDS, ["old-1", "old-2"])
    assert ids[:2] == ["old-1", "old-2"] and len(ids) > 2
    assert list(sink.messages) == ids  # nothing else left in the chat
    assert " ".join(sink.texts).split() == WORDS.split()
    assert noted[-1] == ids  # every part, for a crash after this one
    assert not [c for c in sink.calls if c.kind == "delete"]


async def test_a_shorter_reply_deletes_the_old_messages_it_does_not_need() -> None:
    sink = left_by_an_earlier_try("old-1", "old-2", "old-3")
    ids, noted = await stream(sink, "one two", ["old-1", "old-2", "old-3"])
    assert ids == ["old-1"] and [t.strip() for t in sink.texts] == ["one two"]
    assert [c.message_id for c in sink.calls if c.kind == "delete"] == ["old-2", "old-3"]
    assert noted == []  # no new message


async def test_an_old_message_that_is_gone_moves_the_rest_to_new_messages() -> None:
    sink = left_by_an_earlier_try("old-1", "old-3")  # old-2 was deleted by someone
    ids, _noted = await stream(sink, WORDS, ["old-1", "old-2", "old-3"])
    # Continuing in old-3 after new messages would show the parts out of order.
    assert ids[0] == "old-1" and "old-3" not in ids
    assert list(sink.messages) == ids
    assert " ".join(sink.texts).split() == WORDS.split()


async def test_an_empty_reply_still_replaces_the_half_written_text() -> None:
    sink = left_by_an_earlier_try("old-1", "old-2")
    ids, _noted = await stream(sink, "", ["old-1", "old-2"])
    assert ids == ["old-1"] and sink.texts == ["…"]
