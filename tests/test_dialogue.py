import asyncio
from collections.abc import Sequence

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import dialogue
from bot.answering import SHUTDOWN_NOTE, TRUNCATED_NOTE
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.generators import ChatMessage
from bot.intake import EMPTY_NOTE, INTAKE_FAILED_NOTE, Intake, OnFailure
from storage.repository import SqlStore
from tests.auxil.db import stored_texts
from tests.auxil.factories import dm, group
from tests.auxil.generators import ScriptedGenerator, wait_running
from tests.auxil.sinks import RecordingSink
from tests.auxil.waiting import until


async def test_direct_message_round_trip_is_stored(manager: DialogueManager,
                                                   engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("hello bot"), sink)
    assert sink.texts == ["hello bot"]
    assert sink.calls[-1].final
    assert await stored_texts(engine) == [("user", "hello bot"), ("assistant", "hello bot")]


async def test_messages_of_one_conversation_are_handled_in_order(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    texts = [f"message {n}" for n in range(12)]
    await asyncio.gather(*(manager.submit(dm(t), sink) for t in texts))
    assert sink.texts == texts
    assert generator.max_running == 1


async def test_conversations_run_concurrently(manager: DialogueManager,
                                              generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    sinks = [RecordingSink() for _ in range(5)]
    futures = [manager.submit(dm(f"hi {n}", user=f"u{n}"), sinks[n]) for n in range(5)]
    # All five are generating at once before any is let through.
    await wait_running(generator, 5)
    generator.gate.set()
    await asyncio.gather(*futures)
    assert [s.texts for s in sinks] == [[f"hi {n}"] for n in range(5)]
    assert manager.active_conversations == 0  # idle conversations leave no state behind


async def test_long_reply_continues_in_new_messages_with_code_intact(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    code = "```python\n" + "\n".join(f"x{i} = {i}" for i in range(12)) + "\n```"
    body = ("Some words here. " * 20 + "\n\n" + code + "\n\n" + "More words after. " * 20)
    generator.reply = lambda _messages: body
    generator.pieces_count = 40
    sink = RecordingSink(limit=400)
    await manager.handle(dm("write code"), sink)
    assert len(sink.texts) >= 2
    assert all(len(t) <= 400 for t in sink.texts)
    assert any(code in t for t in sink.texts)  # the block fits in one message: kept whole
    assert "".join(sink.texts).replace("\n", "").replace(" ", "") == \
        body.replace("\n", "").replace(" ", "")


async def test_group_messages_need_addressing(manager: DialogueManager,
                                              engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(group("just chatting"), sink)
    assert sink.calls == []
    assert await stored_texts(engine) == []  # not addressed: not stored either
    await manager.handle(group("@bot hello", mention=True), sink)
    assert sink.texts == ["@bot hello"]


async def test_reply_chain_is_the_group_context(manager: DialogueManager,
                                                generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(group("first question", mention=True, user="u1"), sink)
    bot_message = list(sink.messages)[-1]
    await manager.handle(group("unrelated mention", mention=True, user="u2"), sink)
    await manager.handle(group("follow up", user="u1", reply_to=bot_message,
                               reply_to_bot=True), sink)
    chain = [m.content for m in generator.prompts[-1][1:]]
    assert chain == ["first question", "first question", "follow up"]
    assert "unrelated mention" not in chain


async def test_fresh_mention_carries_the_authors_recent_exchange(
        manager: DialogueManager, generator: ScriptedGenerator, settings: Settings) -> None:
    sink = RecordingSink()
    await manager.handle(group("my earlier question", mention=True, user="u1"), sink)
    await manager.handle(group("someone else", mention=True, user="u2"), sink)
    await manager.handle(group("new mention", mention=True, user="u1"), sink)
    contents = [m.content for m in generator.prompts[-1][1:]]
    assert contents == ["my earlier question", "my earlier question", "new mention"]


async def test_threads_and_chats_keep_their_own_history(manager: DialogueManager,
                                                        generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(group("in thread a", mention=True, thread="a"), sink)
    await manager.handle(group("in thread b", mention=True, thread="b"), sink)
    assert [m.content for m in generator.prompts[-1][1:]] == ["in thread b"]


async def test_history_survives_a_restart_of_the_manager(
        store: SqlStore, settings: Settings) -> None:
    first = ScriptedGenerator()
    async with DialogueManager(store=store, generator=first, settings=settings,
                               commands=builtin_commands()) as manager:
        await manager.handle(dm("remember the number 42"), RecordingSink())
    second = ScriptedGenerator()
    async with DialogueManager(store=store, generator=second, settings=settings,
                               commands=builtin_commands()) as manager:
        await manager.handle(dm("what was the number?"), RecordingSink())
    contents = [m.content for m in second.prompts[0]]
    assert contents[1:] == ["remember the number 42", "remember the number 42",
                            "what was the number?"]


async def test_reset_starts_a_fresh_context(manager: DialogueManager,
                                            generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(dm("old topic"), sink)
    await manager.handle(dm("/reset"), sink)
    await manager.handle(dm("new topic"), sink)
    assert [m.content for m in generator.prompts[-1][1:]] == ["new topic"]


async def test_empty_message_gets_a_note_and_nothing_is_stored(
        manager: DialogueManager, engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("   \n "), sink)
    assert sink.texts == [EMPTY_NOTE]
    assert await stored_texts(engine) == []


async def test_oversized_message_is_cut_with_a_visible_notice(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine,
        settings: Settings) -> None:
    huge = " ".join(f"w{n}" for n in range(5000))
    sink = RecordingSink(limit=100_000)
    await manager.handle(dm(huge), sink)
    assert sink.texts[0].startswith(TRUNCATED_NOTE)
    prompt_user = generator.prompts[0][-1].content
    assert 0 < len(prompt_user) < len(huge)
    assert (await stored_texts(engine))[0] == ("user", huge)  # stored whole: nothing lost


async def test_generator_failure_tells_the_user_and_keeps_their_message(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    generator.fail_after_pieces = 1
    sink = RecordingSink()
    await manager.handle(dm("please answer this"), sink)
    assert "could not finish this reply" in sink.texts[-1]
    assert await stored_texts(engine) == [("user", "please answer this")]
    generator.fail_after_pieces = None
    await manager.handle(dm("and this?"), sink)
    assert sink.texts[-1] == "and this?"


async def test_hanging_generator_times_out(store: SqlStore, settings: Settings,
                                           engine: AsyncEngine) -> None:
    hanging = ScriptedGenerator(hang=True)
    quick = settings.model_copy(update={"generation_timeout": 0.2})
    async with DialogueManager(store=store, generator=hanging, settings=quick,
                               commands=builtin_commands()) as manager:
        sink = RecordingSink()
        await manager.handle(dm("hello?"), sink)
    assert "took too long" in sink.texts[-1]
    assert await stored_texts(engine) == [("user", "hello?")]


async def test_a_message_seen_before_is_not_answered_twice(manager: DialogueManager) -> None:
    sink = RecordingSink()
    await manager.handle(dm("hello", message_id="same"), sink)
    await manager.handle(dm("hello", message_id="same"), sink)
    assert sink.texts == ["hello"]


async def test_edits_are_throttled(store: SqlStore, settings: Settings) -> None:
    now = [0.0]
    generator = ScriptedGenerator(pieces_count=10)
    slow = settings.model_copy(update={"edit_interval": 1.0})

    def reply(_messages: Sequence[ChatMessage]) -> str:
        return "abcdefghij"

    generator.reply = reply
    original = generator.stream

    async def ticking(messages: Sequence[ChatMessage], params: object):  # type: ignore[no-untyped-def]
        async for piece in original(messages, params):  # type: ignore[arg-type]
            now[0] += 0.25  # four pieces a second
            yield piece

    generator.stream = ticking  # type: ignore[method-assign]
    async with DialogueManager(store=store, generator=generator, settings=slow,
                               commands=builtin_commands(), clock=lambda: now[0]) as manager:
        sink = RecordingSink()
        await manager.handle(dm("go"), sink)
    updates = [c for c in sink.calls if c.kind in {"send", "edit"}]
    assert len(updates) == 4  # first piece, one edit per second of 2.5 s, the final edit
    assert updates[-1].final and sink.texts == ["abcdefghij"]


async def test_failed_streaming_edits_do_not_lose_the_reply(manager: DialogueManager,
                                                            generator: ScriptedGenerator) -> None:
    generator.pieces_count = 6
    sink = RecordingSink(fail_edits=True)
    await manager.handle(dm("a reply that is streamed in six pieces"), sink)
    assert sink.texts == ["a reply that is streamed in six pieces"]


async def test_shutdown_ends_an_in_flight_reply_with_a_note(
        store: SqlStore, settings: Settings, engine: AsyncEngine) -> None:
    generator = ScriptedGenerator(hang=True)
    manager = DialogueManager(store=store, generator=generator, settings=settings,
                              commands=builtin_commands(), shutdown_grace=0.1)
    sink = RecordingSink()
    future = manager.submit(dm("long question"), sink)
    await wait_running(generator)
    await manager.close()
    await asyncio.wait_for(future, 1)  # the adapter waiting on it is released
    assert "restarting" in sink.texts[-1]
    assert await stored_texts(engine) == [("user", "long question")]
    # After close, new messages are not taken.
    await manager.handle(dm("too late"), sink)
    assert "too late" not in sink.text


async def test_accepted_means_stored_before_the_answer_is_done(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    generator.gate = asyncio.Event()
    sink = RecordingSink()
    first = manager.submit(dm("one"), sink)
    second = manager.submit(dm("two"), sink)
    # Both are stored while the first is still being generated.
    assert await asyncio.wait_for(second.accepted, 5) is Intake.STORED
    assert await first.accepted is Intake.STORED
    assert await stored_texts(engine) == [("user", "one"), ("user", "two")]
    assert not first.done.done()
    generator.gate.set()
    await asyncio.gather(first, second)
    assert sink.texts == ["one", "two"]


async def test_a_note_still_being_delivered_holds_up_no_intake(
        manager: DialogueManager, engine: AsyncEngine) -> None:
    gate = asyncio.Event()

    class StuckSink(RecordingSink):
        async def send(self, text: str, *, final: bool = False) -> str:
            await gate.wait()  # the platform makes this chat wait (flood control)
            return await super().send(text, final=final)

    sink = StuckSink()
    first = manager.submit(dm("/help"), sink)
    second = manager.submit(dm("store me"), sink)
    # The next message is stored, and may be confirmed, while the note is still waiting.
    assert await asyncio.wait_for(second.accepted, 5) is Intake.STORED
    assert await first.accepted is Intake.TAKEN  # a command: nothing to store
    assert await stored_texts(engine) == [("user", "store me")]
    assert sink.texts == []
    gate.set()
    await asyncio.gather(first, second)
    [note] = [t for t in sink.texts if t != "store me"]
    assert note.startswith("Commands:") and sink.texts.count("store me") == 1
    assert manager.active_conversations == 0


async def test_a_redelivered_pending_message_is_answered_once(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    generator.gate = asyncio.Event()
    sink = RecordingSink()
    first = manager.submit(dm("hello", message_id="m-re"), sink)
    await wait_running(generator)
    again = manager.submit(dm("hello", message_id="m-re"), sink)  # while it is answered
    await again
    generator.gate.set()
    await first
    await manager.handle(dm("hello", message_id="m-re"), sink)  # after it was answered
    assert sink.texts == ["hello"]
    assert await stored_texts(engine) == [("user", "hello"), ("assistant", "hello")]


async def interrupted(store: SqlStore, settings: Settings, text: str, message_id: str,
                      sink: RecordingSink) -> DialogueManager:
    """A process that takes the message, starts its reply and is stopped mid-way; returns
    that (closed) manager."""
    manager = DialogueManager(store=store, generator=ScriptedGenerator(hang=True),
                              settings=settings, commands=builtin_commands(),
                              shutdown_grace=0.05)
    await manager.submit(dm(text, message_id=message_id), sink).accepted
    await manager.close()
    return manager


async def test_pending_messages_are_listed_after_an_interrupted_answer(
        store: SqlStore, settings: Settings) -> None:
    sink = RecordingSink()
    manager = await interrupted(store, settings, "interrupted", "m-int", sink)
    assert sink.texts == [SHUTDOWN_NOTE]
    [pending] = await manager.pending("telegram")
    assert (pending.message.text, pending.platform_message_id) == ("interrupted", "m-int")
    # The next process answers it when the adapter resubmits it, in the message that the
    # interrupted try left: the chat shows one answer, not a stub and an answer.
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as restarted:
        await restarted.handle(dm("interrupted", message_id="m-int"), sink)
        assert sink.texts == ["interrupted"]
        assert await restarted.pending("telegram") == []


async def test_a_skipped_streaming_edit_does_not_abandon_the_half_written_message(
        store: SqlStore, settings: Settings) -> None:
    sink = RecordingSink()
    await interrupted(store, settings, "flaky", "m-flaky", sink)
    sink.fail_edits = True  # streaming edits refused (flood control); final ones go through
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as restarted:
        await restarted.handle(dm("flaky", message_id="m-flaky"), sink)
    assert sink.texts == ["flaky"]


async def test_a_reply_whose_half_written_message_is_gone_starts_anew(
        store: SqlStore, settings: Settings) -> None:
    await interrupted(store, settings, "again", "m-again", RecordingSink())
    other = RecordingSink(fail_unknown_edits=True, prefix="other")  # the old id is unknown
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as restarted:
        await restarted.handle(dm("again", message_id="m-again"), other)
    assert other.texts == ["again"]


async def test_failed_messages_are_not_answered_again(manager: DialogueManager,
                                                      generator: ScriptedGenerator) -> None:
    generator.fail_after_pieces = 0
    sink = RecordingSink()
    await manager.handle(dm("doomed", message_id="m-doom"), sink)
    generator.fail_after_pieces = None
    await manager.handle(dm("doomed", message_id="m-doom"), sink)
    assert len(sink.texts) == 1 and "could not finish" in sink.texts[0]
    assert await manager.pending("telegram") == []


async def test_reset_while_a_reply_is_generating_leaves_that_reply_out(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    sink = RecordingSink()
    old = manager.submit(dm("old topic"), sink)
    await manager.handle(dm("/reset"), sink)  # answered at once, while "old topic" waits
    assert sink.texts[0].startswith("Context cleared")
    generator.gate.set()
    await old
    await manager.handle(dm("new topic"), sink)
    assert [m.content for m in generator.prompts[-1][1:]] == ["new topic"]


async def test_unreadable_attachments_get_a_short_note(manager: DialogueManager) -> None:
    from dataclasses import replace

    sink = RecordingSink()
    await manager.handle(replace(dm(""), unsupported="sticker"), sink)
    await manager.handle(replace(group(""), unsupported="photo"), sink)  # not addressed
    assert sink.texts == ["I can only read text for now, so I cannot see that sticker."]


async def test_chat_admin_is_asked_only_when_a_command_needs_it(
        manager: DialogueManager) -> None:
    asked: list[str] = []

    async def is_admin() -> bool:
        asked.append("asked")
        return True

    sink = RecordingSink()
    await manager.submit(group("/help"), sink, chat_admin=is_admin)
    assert asked == []
    await manager.submit(group("/persona Be terse."), sink, chat_admin=is_admin)
    assert asked == ["asked"] and sink.texts[-1].startswith("Persona set")


async def test_messages_arriving_while_stopping_are_stored_not_answered(
        store: SqlStore, settings: Settings, engine: AsyncEngine) -> None:
    generator = ScriptedGenerator(hang=True)
    manager = DialogueManager(store=store, generator=generator, settings=settings,
                              commands=builtin_commands(), shutdown_grace=0.5)
    sink = RecordingSink()
    manager.submit(dm("in flight"), sink)
    await wait_running(generator)
    closing = asyncio.create_task(manager.close())
    await asyncio.sleep(0.05)
    late = manager.submit(dm("arrived while stopping"), sink)
    command = manager.submit(dm("/reset"), sink)
    assert await late.accepted is Intake.STORED and await command.accepted is Intake.TAKEN
    await closing
    assert "arrived while stopping" not in sink.text and "Context cleared" not in sink.text
    assert [p.message.text for p in await manager.pending("telegram")] == [
        "in flight", "arrived while stopping"]
    after = manager.submit(dm("after close"), sink)
    assert await after.accepted is Intake.CLOSED  # closed: left for the platform to redeliver


async def test_stop_ends_a_reply_at_once_and_keeps_what_was_written(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    generator.hang = True
    sink = RecordingSink()
    running = manager.submit(dm("tell me everything", user="u7"), sink)
    await wait_running(generator)
    stopper = RecordingSink()
    await manager.handle(dm("/stop", user="u7"), stopper)
    assert stopper.texts == ["Stopped."]
    await asyncio.wait_for(running, 5)  # no waiting for the generation timeout
    assert sink.texts == ["(Stopped.)"] and generator.running == 0
    assert await stored_texts(engine) == [("user", "tell me everything"), ("assistant", "")]
    await manager.handle(dm("/stop", user="u7"), stopper)
    assert stopper.texts[-1].startswith("There is no reply")


async def test_in_a_group_only_the_asker_or_an_admin_may_stop_a_reply(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    generator.hang = True
    sink = RecordingSink()
    running = manager.submit(group("a long story please", mention=True, user="u1"), sink)
    await wait_running(generator)
    other = RecordingSink()
    await manager.handle(group("/stop", user="u2"), other)
    assert other.texts[-1].startswith("There is no reply")
    await manager.handle(group("/stop", user="u3", chat_admin=True), other)
    assert other.texts[-1] == "Stopped."
    await asyncio.wait_for(running, 5)


async def test_an_intake_a_stop_cuts_short_before_it_starts_is_settled_and_told(
        store: SqlStore, settings: Settings, engine: AsyncEngine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dialogue, "LATE_INTAKE_S", 0.0)
    manager = DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                              commands=builtin_commands(), shutdown_grace=0.0)
    sink = RecordingSink()
    kept = manager.submit(dm("kept to try again", user="u8"), sink,
                          on_failure=OnFailure.RETRY)
    redelivered = manager.submit(dm("the platform has it", user="u9"), RecordingSink(),
                                 on_failure=OnFailure.REDELIVER)
    await manager.close()  # no time at all: both are cancelled before their first step
    assert kept.accepted.result() is Intake.DROPPED
    assert redelivered.accepted.result() is Intake.FAILED  # not confirmed: comes again
    await asyncio.gather(kept, redelivered)
    assert sink.texts == [INTAKE_FAILED_NOTE]
    assert await stored_texts(engine) == []


async def test_notes_cut_short_by_a_stop_do_not_cancel_their_callers(
        store: SqlStore, settings: Settings) -> None:
    class StuckSink(RecordingSink):
        async def send(self, text: str, *, final: bool = False) -> str:
            await asyncio.Event().wait()  # flood control for longer than the grace
            raise AssertionError("unreachable")

    manager = DialogueManager(store=store, generator=ScriptedGenerator(hang=True),
                              settings=settings, commands=builtin_commands(),
                              shutdown_grace=0.1)
    sink = StuckSink()
    tickets = [manager.submit(dm(text), sink)
               for text in ("/help", "/help", "a question", "/help")]
    await until(lambda: all(ticket.accepted.done() for ticket in tickets),
                "every message taken")
    await manager.close()
    # What `handle` awaits ends normally: its caller was not cancelled, only the note or
    # answer was.
    assert await asyncio.gather(*(ticket.done for ticket in tickets),
                                return_exceptions=True) == [None] * 4


async def test_a_note_after_a_question_goes_out_at_once_one_before_it_first(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    sink = RecordingSink()
    before = manager.submit(dm("/help"), sink)
    question = manager.submit(dm("a question"), sink)
    await wait_running(generator)
    await before
    during = manager.submit(dm("/help"), sink)
    await asyncio.wait_for(during, 5)  # not held up by the reply being generated
    assert [text[:9] for text in sink.texts] == ["Commands:", "Commands:"]
    generator.gate.set()
    await question
    assert sink.texts[-1] == "a question"
