"""Choosing the model per chat (``/model``): CHINWAG_MODELS parsed, the choice listed and
made through the core, Telegram, Discord and the console, stored across restarts, prompts
budgeted with the chosen model's own token counts, models loaded on first use, at most
CHINWAG_MAX_LOADED_MODELS in-process models loaded and none unloaded mid-reply."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest
from prometheus_client import generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.builtin_commands import builtin_commands
from bot.config import Settings, load_settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, ModelUnavailable
from bot.generators.catalog import ModelCatalog, ModelEntry
from bot.generators.pool import RETRY_LOAD_AFTER_S, ModelPool
from bot.generators.stats import SchedulerStats
from bot.metrics import Metrics
from bot.store import NewReply, NewUserMessage, Role
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.factories import dm, group
from tests.auxil.generators import ScriptedGenerator, wait_running
from tests.auxil.process import chinwag
from tests.auxil.sinks import RecordingSink
from tests.auxil.telegram_api import TelegramEmulator
from tests.auxil.waiting import until

ADMIN = "admin1"  # the settings fixture's telegram:admin1
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do"
"""Ten words, 59 characters: cheap for a model counting words, dear for one counting
characters."""


@dataclass
class Model(ScriptedGenerator):
    """A model double: replies ``<label>: <question>``, counts tokens its own way (words,
    or characters), and records being loaded and closed."""

    label: str = "a"
    per_char: bool = False
    loads: int = 0
    closes: int = 0
    load_error: str | None = None
    trouble: str | None = None
    stats: SchedulerStats | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reply = lambda messages: f"{self.label}: {messages[-1].content}"

    @property
    def loaded(self) -> bool:
        return self.loads > self.closes

    async def __aenter__(self) -> Self:
        if self.load_error is not None:
            raise ModelUnavailable(self.load_error)
        self.loads += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.running == 0, "closed while writing a reply"
        self.closes += 1

    def health(self) -> str | None:
        return self.trouble

    def scheduler_stats(self) -> SchedulerStats | None:
        return self.stats

    def count_tokens(self, role: str, text: str) -> int:
        return len(text) + 4 if self.per_char else super().count_tokens(role, text)


def catalog(*others: str) -> ModelCatalog:
    """``default`` is model ``a``; each other name its own model; all in-process."""
    return ModelCatalog(ModelEntry("default", "transformers", "a"),
                        tuple(ModelEntry(name, "transformers", name) for name in others))


@pytest.fixture
def models() -> dict[str, Model]:
    return {"a": Model(label="a"), "b": Model(label="b", per_char=True)}


@asynccontextmanager
async def chinwag_with(store: SqlStore, settings: Settings, models: dict[str, Model], *,
                       max_loaded: int = 2, names: Sequence[str] = ("b",),
                       clock: Callable[[], float] = time.monotonic,
                       ) -> AsyncIterator[tuple[DialogueManager, ModelPool]]:
    """A manager whose chats may choose among ``models``, as ``bot/app.py`` wires it."""
    pool = ModelPool(catalog(*names), lambda entry: models[entry.model],
                     max_loaded=max_loaded, clock=clock)
    async with pool, DialogueManager(store=store, models=pool, settings=settings,
                                     commands=builtin_commands(pool.catalog.names)) as manager:
        yield manager, pool


_sinks = itertools.count()


async def said(manager: DialogueManager, message_text: str, *, user: str = "u1",
               in_group: bool = False) -> str:
    """What the bot answers ``user``, in a DM or the group ``g1``."""
    sink = RecordingSink(prefix=f"bot{next(_sinks)}")  # platform ids unique per chat
    message = group(message_text, user=user, mention=True) if in_group \
        else dm(message_text, user=user)
    await manager.handle(message, sink)
    return "\n".join(sink.messages.values())


# CHINWAG_MODELS.

def test_models_are_parsed_with_the_default_first(tmp_path: Path) -> None:
    (tmp_path / "t5").mkdir()
    settings = load_settings(models=f" smol=transformers:builtin , Classic=seq2seq:{tmp_path}"
                                    "/t5, remote=openai:qwen2.5:7b, test=echo,",
                             generator="transformers", model="builtin")
    found = settings.model_catalog()
    assert list(found) == [
        ModelEntry("default", "transformers", "builtin"),
        ModelEntry("smol", "transformers", "builtin"),
        ModelEntry("classic", "seq2seq", f"{tmp_path}/t5"),
        ModelEntry("remote", "openai", "qwen2.5:7b"),  # a served name may hold a colon
        ModelEntry("test", "echo", "builtin"),
    ]
    assert [e.in_process for e in found] == [True, True, True, False, False]
    # The same kind and model under two names is one model, counting tokens alike.
    assert found.counts_alike(None, found.resolve("smol"))
    assert not found.counts_alike("remote", found.resolve("smol"))
    assert not found.counts_alike("retired", found.resolve("smol"))
    assert found.resolve("SMOL").name == "smol"
    assert found.resolve("retired") == found.default


def test_without_models_there_is_one_and_no_model_command() -> None:
    settings = load_settings()
    assert settings.model_catalog().names == ("default",)
    assert settings.max_loaded_models == 1
    assert builtin_commands(settings.model_catalog().names).get("model") is None


@pytest.mark.parametrize(("models", "says"), [
    ("smol", "'smol' is not of the form name=kind:model"),
    ("smol=", "'smol=' is not of the form name=kind:model"),
    ("a b=echo", "'a b' is not a model name"),
    ("-x=echo", "'-x' is not a model name"),
    ("default=echo", "the name 'default' is taken"),
    ("a=echo, A=echo", "'a' is named twice"),
    ("a=llama:x", "a: the kind 'llama' is not one of transformers, seq2seq, openai, echo"),
    ("a=openai", "a: name the model the server serves"),
    ("a=transformers:./missing", "a: ./missing does not exist or is not readable"),
    ("a=transformers:/no/such/folder", "a: /no/such/folder does not exist"),
    ("a=seq2seq:/no/such/folder", "a: name the folder `chinwag train seq2seq` wrote"),
])
def test_bad_models_are_one_clear_line(models: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"^CHINWAG_MODELS: ") as raised:
        load_settings(models=models)
    assert says in str(raised.value)


# Storage.

async def test_the_choice_and_who_counted_are_stored(any_engine: AsyncEngine) -> None:
    store = SqlStore(any_engine)
    conversation = await store.conversation("discord:5")
    assert conversation.model is None
    await store.set_model(conversation.id, "smol")
    assert (await store.conversation("discord:5")).model == "smol"
    admission = await store.add_user_message(NewUserMessage(
        conversation_id=conversation.id, platform="discord", author_id="7", author_name="Ann",
        platform_message_id="m1", text="hi", tokens=6, reply_to_platform_id=None,
        counted_by="smol"))
    assert admission.message.counted_by == "smol"
    await store.add_reply(NewReply(
        conversation_id=conversation.id, reply_to_id=admission.message.id, platform="discord",
        author_id="7", text="hello", tokens=9, prompt_tokens=20, generation_ms=5,
        platform_message_ids=["r1"]))
    stored = await store.history(conversation.id, 0, 10**9, 10)
    assert [(m.text, m.counted_by) for m in stored] == [("hello", None), ("hi", "smol")]
    await store.set_model(conversation.id, None)
    assert (await store.conversation("discord:5")).model is None


# /model in a chat.

async def test_model_lists_switches_and_clears(store: SqlStore, settings: Settings,
                                               models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, _pool):
        listing = await said(manager, "/model")
        assert listing.splitlines() == [
            "Models (/model <name> picks one for this chat, /model default goes back):",
            "default — transformers: a (answers here)",
            "b — transformers: b",
        ]
        assert await said(manager, "/model B") == (
            "From the next message on, b answers here (transformers: b). It is loaded "
            "then, so that reply takes a little longer.")
        assert "b — transformers: b (answers here)" in await said(manager, "/model")
        assert await said(manager, "hello") == "b: hello"
        assert (await store.conversation("telegram:u1")).model == "b"
        assert await said(manager, "/model default") == (
            "From the next message on, default answers here (transformers: a).")
        assert (await store.conversation("telegram:u1")).model is None
        assert await said(manager, "again") == "a: again"
        # Another chat never chose: the default.
        assert await said(manager, "hi", user="u2") == "a: hi"


async def test_an_unknown_name_is_told_the_names(store: SqlStore, settings: Settings,
                                                 models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, _pool):
        answer = await said(manager, "/model gpt-9")
        assert "gpt-9" in answer and "default, b" in answer
        assert (await store.conversation("telegram:u1")).model is None


async def test_admins_only_in_groups_open_in_direct_chats(store: SqlStore, settings: Settings,
                                                          models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, _pool):
        assert await said(manager, "/model b", user="u7", in_group=True) == \
            "Sorry, /model is for admins only."
        assert await said(manager, "/model", user="u7", in_group=True) == \
            "Sorry, /model is for admins only."
        assert (await store.conversation("telegram:g1")).model is None
        assert (await said(manager, "/model b", user=ADMIN, in_group=True)).startswith(
            "From the next message on, b answers here")
        assert await said(manager, "what now", user="u7", in_group=True) == "b: what now"
        assert (await said(manager, "/model b", user="u7")).startswith(
            "From the next message on, b answers here")  # their own DM


async def test_a_name_no_longer_configured_falls_back_to_the_default(
        store: SqlStore, settings: Settings, models: dict[str, Model]) -> None:
    conversation = await store.conversation("telegram:u1")
    await store.set_model(conversation.id, "retired")
    async with chinwag_with(store, settings, models) as (manager, _pool):
        assert await said(manager, "hello") == "a: hello"
        listing = await said(manager, "/model")
        assert "default — transformers: a (answers here)" in listing
        assert listing.splitlines()[-1] == ("This chat chose retired, which is no longer "
                                            "configured, so the default model answers.")


async def test_the_choice_survives_a_restart(store: SqlStore, settings: Settings) -> None:
    first = {"a": Model(label="a"), "b": Model(label="b")}
    async with chinwag_with(store, settings, first) as (manager, _pool):
        await said(manager, "/model b")
    assert first["b"].loads == 0
    again = {"a": Model(label="a"), "b": Model(label="b")}
    async with chinwag_with(store, settings, again) as (manager, _pool):
        assert await said(manager, "hello") == "b: hello"
        assert "b — transformers: b (answers here)" in await said(manager, "/model")


async def test_a_model_that_cannot_load_is_a_clear_failure(
        store: SqlStore, settings: Settings, models: dict[str, Model]) -> None:
    models["b"].load_error = "out of memory"
    now = [0.0]
    async with chinwag_with(store, settings, models, clock=lambda: now[0]) as (manager, pool):
        await said(manager, "/model b")
        assert await said(manager, "hello") == ("Sorry, I could not finish this reply (the "
                                                "model could not be loaded). Please try again.")
        # Marked failed, not left pending: a restart does not try it again.
        assert await store.pending("telegram", datetime(2000, 1, 1, tzinfo=UTC), 10) == []
        models["b"].load_error = None
        assert (await said(manager, "too soon")).startswith("Sorry, I could not finish")
        now[0] += RETRY_LOAD_AFTER_S  # loading is tried again at the next use after that
        assert await said(manager, "again") == "b: again"
        assert pool.is_loaded(pool.catalog.resolve("b"))


class HalfLoading(Model):
    """Starts something (a scheduler thread, a client), then fails to load."""

    started: int = 0

    async def __aenter__(self) -> Self:
        self.started += 1
        raise ModelUnavailable("the chat template failed")

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.started -= 1


async def test_what_a_failed_load_started_is_closed(models: dict[str, Model]) -> None:
    models["b"] = HalfLoading(label="b")
    now = [0.0]
    pool = ModelPool(catalog("b"), lambda entry: models[entry.model], max_loaded=2,
                     clock=lambda: now[0])
    async with pool:
        for _ in range(3):  # each use after the pause tries again
            with pytest.raises(ModelUnavailable, match="the chat template failed"):
                async with pool.use("b"):
                    pass
            now[0] += RETRY_LOAD_AFTER_S
    assert models["b"].started == 0  # type: ignore[attr-defined]


async def test_a_model_that_failed_to_load_pushes_no_loaded_one_out(
        models: dict[str, Model]) -> None:
    models["b"] = Model(label="b", load_error="no such folder")
    now = [0.0]
    made: list[str] = []

    def factory(entry: ModelEntry) -> Model:
        made.append(entry.name)
        return models[entry.model]

    pool = ModelPool(catalog("b"), factory, max_loaded=1, clock=lambda: now[0])
    async with pool:
        for _ in range(3):
            with pytest.raises(ModelUnavailable, match="no such folder"):
                async with pool.use("b"):
                    pass
        # One try: the default was unloaded for it once, and is loaded again once.
        assert made == ["default", "b"]
        async with pool.use(None) as used:
            assert used.generator is models["a"]
        assert models["a"].loads == 2
        now[0] += RETRY_LOAD_AFTER_S  # a minute on, the next use tries again
        with pytest.raises(ModelUnavailable, match="no such folder"):
            async with pool.use("b"):
                pass
        assert made == ["default", "b", "default", "b"]


# Token counts: each model its own.

async def test_history_is_budgeted_with_the_chosen_models_counts(
        store: SqlStore, settings: Settings, models: dict[str, Model]) -> None:
    settings = settings.model_copy(update={"context_tokens": 256, "max_reply_tokens": 16})
    words, chars = models["a"], models["b"]
    async with chinwag_with(store, settings, models) as (manager, _pool):
        for number in range(3):
            await said(manager, f"{number} {WORDS}")
        await said(manager, "/model b")
        assert await said(manager, "and now?") == "b: and now?"
        assert await said(manager, "and then?") == "b: and then?"
    # Counted in words, the whole history fits, as the default model saw it...
    assert len(words.prompts[-1]) == 1 + 4 + 1
    assert sum(chars.count_tokens(m.role, m.content) for m in words.prompts[-1]) > 240
    # ...but counted as b counts it (characters), only its newest part does.
    for prompt in chars.prompts:
        used = sum(chars.count_tokens(m.role, m.content) for m in prompt) \
            + chars.prompt_overhead
        assert used <= 256 - 16
        assert 2 < len(prompt) < 1 + 6 + 1
    # Counts are stored with the model that made them: the default counted "and now?"
    # (b was not loaded yet), b counted "and then?" and both replies.
    conversation = await store.conversation("telegram:u1")
    newest = await store.history(conversation.id, 0, 10**9, 4)
    assert [(m.role, m.counted_by) for m in newest] == [
        (Role.ASSISTANT, "b"), (Role.USER, "b"), (Role.ASSISTANT, "b"), (Role.USER, None)]
    assert newest[0].tokens == len("b: and then?") + 4


async def test_persona_length_is_counted_with_the_chats_model(
        store: SqlStore, settings: Settings, models: dict[str, Model]) -> None:
    persona = " ".join(["pirate"] * 100)  # 104 tokens in words, 703 in characters
    async with chinwag_with(store, settings, models) as (manager, _pool):
        assert await said(manager, f"/persona {persona}") == \
            "Persona set. It applies from the next message."
        await said(manager, "/model b")
        await said(manager, "hello")  # b is loaded now
        assert "too long" in await said(manager, f"/persona {persona}")


# Loading.

async def test_a_model_is_loaded_on_first_use(store: SqlStore, settings: Settings,
                                              models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, pool):
        assert (models["a"].loads, models["b"].loads) == (1, 0)  # the default at start
        await said(manager, "/model b")
        await said(manager, "hello", user="u2")  # the default's: u2 never chose
        assert models["b"].loads == 0
        assert not pool.is_loaded(pool.catalog.resolve("b"))
        await said(manager, "hello", user="u1")
        assert models["b"].loads == 1
    assert (models["a"].closes, models["b"].closes) == (1, 1)


async def test_the_least_recently_used_model_makes_room(store: SqlStore, settings: Settings,
                                                        models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models, max_loaded=1) as (manager, _pool):
        await said(manager, "/model b", user="u1")
        assert await said(manager, "hi", user="u1") == "b: hi"
        assert (models["a"].closes, models["b"].loads) == (1, 1)
        assert await said(manager, "hello", user="u2") == "a: hello"
        assert (models["a"].loads, models["b"].closes) == (2, 1)
        assert await said(manager, "hi again", user="u1") == "b: hi again"
        assert models["b"].loads == 2
        assert not models["a"].loaded


async def test_models_of_other_servers_are_not_counted(store: SqlStore, settings: Settings,
                                                       models: dict[str, Model]) -> None:
    remote = Model(label="r")
    pool = ModelPool(ModelCatalog(ModelEntry("default", "transformers", "a"),
                                  (ModelEntry("r", "openai", "served"),)),
                     lambda entry: remote if entry.kind == "openai" else models["a"],
                     max_loaded=1)
    async with pool:
        async with pool.use("r") as model:
            assert model.generator is remote
        assert models["a"].loaded and remote.loaded


async def test_a_model_is_never_unloaded_mid_reply(store: SqlStore, settings: Settings,
                                                   models: dict[str, Model]) -> None:
    a, b = models["a"], models["b"]
    a.gate = asyncio.Event()
    async with chinwag_with(store, settings, models, max_loaded=1) as (manager, pool):
        await said(manager, "/model b", user="u2")
        slow_sink, waiting_sink = RecordingSink(), RecordingSink()
        slow = manager.submit(dm("a long answer", user="u1"), slow_sink)
        await wait_running(a)
        waiting = manager.submit(dm("my turn", user="u2"), waiting_sink)
        # b needs a's place: a takes no new work, but is not closed while it writes.
        await until(lambda: not pool.is_loaded(pool.catalog.default), "a to drain")
        late_sink = RecordingSink()
        late = manager.submit(dm("me too", user="u3"), late_sink)  # a's: waits for a again
        await until(lambda: waiting_sink.calls, "the waiting chat to see 'typing'")
        assert (a.closes, b.loads, a.running) == (0, 0, 1)
        a.gate.set()
        await slow
        await waiting
        await late
        assert list(slow_sink.messages.values()) == ["a: a long answer"]
        assert list(waiting_sink.messages.values()) == ["b: my turn"]
        assert list(late_sink.messages.values()) == ["a: me too"]
        assert (a.loads, a.closes, b.loads, b.closes) == (2, 1, 1, 1)


# Health and metrics with several models.

async def test_health_and_scheduler_metrics_cover_every_loaded_model(
        models: dict[str, Model]) -> None:
    a, b = models["a"], models["b"]
    a.stats, b.stats = SchedulerStats(tokens=5, steps=1), SchedulerStats(tokens=7, steps=2)
    metrics = Metrics()
    pool = ModelPool(catalog("b"), lambda entry: models[entry.model], max_loaded=1)
    async with pool:
        metrics.watch(pool, model="a")
        assert pool.health() is None
        async with pool.use("b"):
            pass
        assert not a.loaded  # a went for b; what its scheduler did still counts
        assert pool.scheduler_stats() == SchedulerStats(tokens=12, steps=3)
        assert b"chinwag_scheduler_tokens_total 12.0" in generate_latest(metrics.registry)
        b.trouble = "the scheduler has not stepped for 10 s"
        assert pool.health() == "b: the scheduler has not stepped for 10 s"
        a.trouble = "closed models are not asked"
        assert pool.health() == "b: the scheduler has not stepped for 10 s"


# Through the platforms.

async def test_telegram_lists_the_models_in_help_and_switches(
        store: SqlStore, settings: Settings, models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, pool), \
            TelegramEmulator() as tg, \
            telegram_adapter(tg, manager, builtin_commands(pool.catalog.names)):
        registered = tg.sent("setMyCommands")[0]["commands"]
        assert "model" in {c["command"] for c in registered}
        tg.push_text("/help", chat=5, user=5)
        await tg.wait_for(lambda: len(tg.final_text(5)) == 1)
        assert "Models: default, b (/model <name> picks one for this chat)." in \
            tg.final_text(5)[0]
        tg.push_text("/model b", chat=5, user=5)
        tg.push_text("hello", chat=5, user=5)
        await tg.wait_for(lambda: tg.final_text(5)[2:] == ["b: hello"])
        assert tg.final_text(5)[1].startswith("From the next message on, b answers here")


async def test_discord_offers_the_names_as_a_menu(store: SqlStore, settings: Settings,
                                                  models: dict[str, Model]) -> None:
    async with chinwag_with(store, settings, models) as (manager, pool), \
            DiscordEmulator() as dc, \
            discord_adapter(dc, manager, builtin_commands(pool.catalog.names)):
        [sync] = dc.calls("PUT", "/commands")
        commands = {c["name"]: c for c in sync.body}  # type: ignore[union-attr]
        [option] = commands["model"]["options"]
        assert option["name"] == "name" and not option["required"]
        assert [c["value"] for c in option["choices"]] == ["default", "b"]
        token = dc.interact("model", {"name": "b"}, dm=True, author=5)
        await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
        assert dc.interaction_replies[token][1]["content"].startswith(
            "From the next message on, b answers here")
        dc.post("hello", dm=True, author=5)
        await dc.wait_for(lambda: dc.channel_texts(dc.dm_channel(5)) == ["b: hello"])


def test_the_console_chooses_and_remembers(tmp_path: Path) -> None:
    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo",
           "CHINWAG_MODELS": "loud=echo:loud"}
    first = chinwag("console", stdin="/model loud\nhello\n", env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "From the next message on, loud answers here (echo: loud).", "hello"]
    again = chinwag("console", stdin="/model\n", env=env, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "loud — echo: loud (answers here)" in again.stdout.splitlines()

