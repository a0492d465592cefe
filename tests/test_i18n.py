"""Chinese and English: every text the bot says has a translation in each language and the
compiled catalogs match their sources; each user gets their language (chosen with
/language, else their app's, else CHINWAG_LANGUAGE) in the core, on Telegram and on
Discord; Chinese text survives splitting, formatting and Telegram's UTF-16 limit."""

from __future__ import annotations

import gettext
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from string import Formatter
from typing import Any

import pytest
from babel.messages.catalog import Catalog, Message
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from adapters.telegram.formatting import to_html
from bot.answering import FAILED_NOTE
from bot.builtin_commands import builtin_commands
from bot.config import DEFAULT_SYSTEM_PROMPT, Settings, load_settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError
from bot.events import IncomingMessage
from bot.i18n import LANGUAGES, SOURCE_LANGUAGE, Language, Source, choose, supported, translator
from bot.intake import EMPTY_NOTE
from bot.splitting import split_text
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.factories import dm
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.sinks import RecordingSink
from tests.auxil.telegram_api import TelegramEmulator

ROOT = Path(__file__).resolve().parents[1]
LOCALE = ROOT / "bot" / "locale"
TEMPLATE = LOCALE / "chinwag.pot"
TRANSLATED = [language for language in LANGUAGES if language != SOURCE_LANGUAGE]
FIX = "run `make translations`, then translate what is new in bot/locale/*/LC_MESSAGES/*.po"

HELP_ZH = "命令："
LANGUAGE_LINE_ZH = "/language [language] — 查看或选择我和你交流所用的语言"


# The catalogs.

def _po(language: str) -> Catalog:
    with (LOCALE / language / "LC_MESSAGES" / "chinwag.po").open("rb") as file:
        return read_po(file)


def _ids(catalog: Catalog) -> set[str | tuple[str, ...]]:
    return {message.id for message in catalog if message.id}


def _marked_in_code() -> set[str | tuple[str, ...]]:
    """Every text marked in bot/ and adapters/, as ``pybabel extract`` finds it."""
    keywords = {**DEFAULT_KEYWORDS, "N_": None}
    found: set[str | tuple[str, ...]] = set()
    for folder in ("bot", "adapters"):
        for _file, _line, message, _comments, _context in extract_from_dir(
                ROOT / folder, keywords=keywords):
            found.add(message)
    return found


def _fields(text: str) -> list[tuple[str, str | None, str]]:
    """The ``str.format`` fields of a text: name, conversion, format spec."""
    return sorted((name, conversion, spec or "")
                  for _literal, name, spec, conversion in Formatter().parse(text)
                  if name is not None)


def _pairs(message: Message) -> list[tuple[str, str]]:
    """Each translation with the source text it stands for."""
    if isinstance(message.id, str):
        assert isinstance(message.string, str)
        return [(message.id, message.string)]
    singular, plural = message.id[0], message.id[1]
    return [(singular if index == 0 and len(message.string) > 1 else plural, text)
            for index, text in enumerate(message.string)]


def test_every_text_marked_in_the_code_is_in_the_template() -> None:
    with TEMPLATE.open("rb") as file:
        template = _ids(read_po(file))
    marked = _marked_in_code()
    assert marked - template == set(), f"texts missing from the template: {FIX}"
    assert template - marked == set(), f"texts no longer in the code: {FIX}"


@pytest.mark.parametrize("language", TRANSLATED)
def test_every_text_has_a_translation(language: str) -> None:
    with TEMPLATE.open("rb") as file:
        template = _ids(read_po(file))
    catalog = _po(language)
    assert _ids(catalog) == template, FIX
    for message in catalog:
        if not message.id:
            continue
        assert not message.fuzzy, f"{message.id!r} is marked fuzzy: check its translation"
        for source, text in _pairs(message):
            assert text.strip(), f"{message.id!r} has no {language} text"
            # A translation that loses or renames a field would fail at .format().
            assert _fields(text) == _fields(source), (message.id, text)


@pytest.mark.parametrize("language", TRANSLATED)
def test_the_compiled_catalog_is_the_one_its_source_makes(language: str) -> None:
    compiled = BytesIO()
    write_mo(compiled, _po(language))
    compiled.seek(0)
    expected = gettext.GNUTranslations(compiled)
    with (LOCALE / language / "LC_MESSAGES" / "chinwag.mo").open("rb") as file:
        shipped = gettext.GNUTranslations(file)
    # The header ("") names the Babel that compiled it; the texts must be the same.
    texts = {k: v for k, v in expected._catalog.items() if k != ""}
    assert {k: v for k, v in shipped._catalog.items() if k != ""} == texts, \
        f"the .mo is older than its .po: {FIX}"


def test_english_is_the_texts_themselves_and_chinese_has_each() -> None:
    en, zh = translator("en"), translator("zh")
    with TEMPLATE.open("rb") as file:
        for message in read_po(file):
            if isinstance(message.id, str) and message.id:
                assert en.gettext(message.id) == message.id
                assert zh.gettext(message.id) != message.id or \
                    not re.search(r"[A-Za-z]{3}", re.sub(r"\{[^}]*\}", "", message.id))
    assert zh.ngettext("Done: I deleted {count} stored message (yours and my replies to you) "
                       "and everything else I kept about you.",
                       "Done: I deleted {count} stored messages (yours and my replies to "
                       "you) and everything else I kept about you.", 2).startswith("完成")


def test_every_command_description_fits_telegram_and_discord() -> None:
    for language in LANGUAGES:
        tr = translator(language)
        for command in builtin_commands():
            # Discord takes 1-100 characters, Telegram 1-256.
            assert 1 <= len(tr.gettext(command.description)) <= 100, command.name
            for argument in command.arguments:
                assert 1 <= len(tr.gettext(argument.description)) <= 100, argument.name


# Which language.

@pytest.mark.parametrize(("tag", "language"), [
    ("zh-hans", "zh"), ("zh-CN", "zh"), ("zh-TW", "zh"), ("zh_Hant_HK", "zh"), ("ZH", "zh"),
    ("en-US", "en"), ("en", "en"), ("fr", None), ("pt-br", None), ("", None), (None, None),
])
def test_platform_language_tags(tag: str | None, language: str | None) -> None:
    assert supported(tag) == language


def test_a_choice_beats_the_platform_which_beats_the_default() -> None:
    assert choose("en", "zh-CN", "zh") == Language("en", Source.CHOSEN, "zh")
    assert choose(None, "zh-hans", "en") == Language("zh", Source.PLATFORM, "zh")
    assert choose(None, "fr-FR", "zh") == Language("zh", Source.DEFAULT)
    assert choose(None, None, "en") == Language("en", Source.DEFAULT)
    assert choose("xx", None, "zh").code == "zh"  # a stored value Chinwag no longer speaks


def test_chinwag_language_setting() -> None:
    assert load_settings(generator="echo").language == "en"
    assert load_settings(generator="echo", language="zh-CN").language == "zh"
    with pytest.raises(ConfigError, match="CHINWAG_LANGUAGE"):
        load_settings(generator="echo", language="fr")


def test_the_default_system_prompt_follows_the_language_unless_the_operator_set_one(
        settings: Settings) -> None:
    zh = translator("zh")
    assert settings.default_system_prompt(zh) == "你是一个乐于助人的助手。"
    assert settings.default_system_prompt(translator("en")) == DEFAULT_SYSTEM_PROMPT
    own = settings.model_copy(update={"system_prompt": "You are a pirate."})
    assert own.default_system_prompt(zh) == "You are a pirate."


# In the core.

def _zh(text: str, tag: str = "zh-hans", **kwargs: Any) -> IncomingMessage:
    return replace(dm(text, **kwargs), language=tag)


async def test_a_user_whose_app_is_chinese_gets_chinese(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(_zh(""), sink)
    await manager.handle(_zh("/help"), sink)
    await manager.handle(_zh("/settings temperature hot"), sink)
    await manager.handle(_zh("你好"), sink)
    empty, help_text, refused, reply = sink.texts
    assert empty == "你的消息是空的：请发送一些文字。"
    assert help_text.startswith(HELP_ZH) and LANGUAGE_LINE_ZH in help_text
    assert "/stats — 使用统计（仅限管理员）" in help_text
    assert refused == "temperature 必须是 0 到 2 之间的数字（收到的是 'hot'）。"
    assert reply == "你好"
    assert generator.prompts[-1][0].content == "你是一个乐于助人的助手。"
    await manager.handle(dm("hello", user="u2"), sink)  # another user, no language given
    assert generator.prompts[-1][0].content == DEFAULT_SYSTEM_PROMPT


async def test_a_persona_is_never_translated(manager: DialogueManager,
                                            generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(_zh("/persona You are a pirate."), sink)
    await manager.handle(_zh("/persona"), sink)
    await manager.handle(_zh("你好"), sink)
    assert sink.texts[:2] == ["人设已设置，从下一条消息开始生效。", "人设：You are a pirate."]
    assert generator.prompts[-1][0].content == "You are a pirate."


async def test_language_command_chooses_shows_and_clears(manager: DialogueManager) -> None:
    sink = RecordingSink()
    for text in ("/language", "/language en", "/language", "", "/language default"):
        await manager.handle(_zh(text), sink)
    await manager.handle(dm("/language"), sink)  # no tag: the one seen last stands
    await manager.handle(_zh("/language fr"), sink)
    assert sink.texts == [
        "我用中文和你交流（跟随你的应用设置）。用 /language en 或 /language zh 可以更改；"
        "用 /language default 则重新跟随你的应用语言。",
        "From now on I speak English with you.",
        "I speak English with you (you chose it with /language). /language en or "
        "/language zh changes it; /language default follows your app again.",
        EMPTY_NOTE,
        "从现在起，我跟随你的应用语言：中文。",  # CHINWAG_LANGUAGE is en: no "default"
        "我用中文和你交流（跟随你的应用设置）。用 /language en 或 /language zh 可以更改；"
        "用 /language default 则重新跟随你的应用语言。",
        "language 必须是 en, zh, default 之一（收到的是 'fr'）。用法：/language [language]",
    ]


async def test_chinwag_language_speaks_to_whoever_gives_no_language(
        store: SqlStore, generator: ScriptedGenerator, settings: Settings) -> None:
    chinese = settings.model_copy(update={"language": "zh"})
    sink = RecordingSink()
    async with DialogueManager(store=store, generator=generator, settings=chinese,
                               commands=builtin_commands()) as manager:
        await manager.handle(dm("/language"), sink)
        await manager.handle(dm("/language default"), sink)
        await manager.handle(_zh("/stop", tag="en-GB"), sink)
    assert sink.texts == [
        "我用中文和你交流（机器人的默认设置）。用 /language en 或 /language zh 可以更改；"
        "用 /language default 则重新跟随你的应用语言。",
        "从现在起，我跟随你的应用语言；由于不知道或不支持你的应用语言，我使用机器人的默认语言：中文。",
        "There is no reply of yours being written here to stop."]


async def test_a_failed_reply_says_why_in_the_askers_language(
        store: SqlStore, settings: Settings) -> None:
    generator = ScriptedGenerator(fail_after_pieces=0)
    sink, english = RecordingSink(), RecordingSink()
    async with DialogueManager(store=store, generator=generator, settings=settings,
                               commands=builtin_commands()) as manager:
        await manager.handle(_zh("你好"), sink)
        await manager.handle(dm("hello", user="u2"), english)
    # "the model crashed" is no text Chinwag knows: Chinese readers get a plain reason.
    assert sink.texts == ["抱歉，这条回复没能完成（模型出错了）。请再试一次。"]
    assert english.texts == [FAILED_NOTE.format(reason="the model crashed")]
    zh = translator("zh")
    assert zh.gettext("too many conversations at once; try again shortly") == \
        "同时进行的对话太多，请稍后再试"


# Splitting and formatting.

CHINESE = "这是一个很长的回答，里面有表情😀和**加粗**的文字，还有`代码`。"


def test_chinese_is_split_after_a_sentence_and_nothing_is_lost() -> None:
    text = CHINESE * 200
    parts = split_text(text, 500)
    assert len(parts) > 1 and all(len(part) <= 500 for part in parts)
    assert all(part.endswith("。") for part in parts[:-1])
    assert "".join(parts) == text


def test_a_closing_quote_stays_with_its_sentence() -> None:
    text = ("很" * 60 + "他说：“好。”" + "然" * 30 + "（真的？）" + "后" * 20) * 5
    parts = split_text(text, 100)
    assert all(len(part) <= 100 for part in parts)
    assert not any(part[0] in "”）" for part in parts)
    assert {part[-2:] for part in parts} >= {"。”", "？）"}
    assert "".join(parts) == text


def test_chinese_markdown_is_formatted_for_telegram() -> None:
    html = to_html("**重点**：请看`代码`和~~删除~~。\n\n```python\nprint('你好')\n```")
    assert "<b>重点</b>：请看<code>代码</code>和<s>删除</s>。" in html
    assert "print(&#x27;你好&#x27;)" in html or "print('你好')" in html


# Telegram.

@pytest.fixture
async def telegram() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


async def test_telegram_registers_the_command_menu_in_each_language(
        telegram: TelegramEmulator, manager: DialogueManager) -> None:
    async with telegram_adapter(telegram, manager):
        pass
    menus = {call.get("language_code"): {c["command"]: c["description"]
                                         for c in call["commands"]}
             for call in telegram.sent("setMyCommands")}
    assert set(menus) == {None, "en", "zh"}
    assert menus[None] == menus["en"] and menus["en"]["help"] == "list the commands"
    assert menus["zh"]["help"] == "列出所有命令"
    assert set(menus["zh"]) == {c.name for c in builtin_commands()}


async def test_with_chinwag_language_zh_the_menus_are_chinese_but_for_english_apps(
        telegram: TelegramEmulator, discord: DiscordEmulator,
        manager: DialogueManager) -> None:
    async with TelegramAdapter(telegram.token, manager, builtin_commands(),
                               api_url=telegram.url, language="zh"), \
            DiscordAdapter(discord.token, manager, builtin_commands(), api_url=discord.api_url,
                           gateway_url=discord.gateway_url, language="zh"):
        pass
    menus = {call.get("language_code"): call["commands"][0]["description"]
             for call in telegram.sent("setMyCommands")}
    assert menus == {None: "列出所有命令", "zh": "列出所有命令", "en": "list the commands"}
    [sync] = discord.calls("PUT", "/commands")
    helped = next(c for c in sync.body if c["name"] == "help")  # type: ignore[union-attr]
    assert helped["description"] == "列出所有命令"
    assert helped["description_localizations"]["en-US"] == "list the commands"


async def test_a_telegram_user_whose_app_is_chinese_gets_chinese(
        telegram: TelegramEmulator, manager: DialogueManager) -> None:
    sticker = {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1,
               "height": 1, "is_animated": False, "is_video": False}
    async with telegram_adapter(telegram, manager):
        telegram.push_message(telegram.user_message(chat=5, user=5, language="zh-hans",
                                                    sticker=sticker))
        telegram.push_text("/help", chat=5, user=5, language="zh-hans")
        await telegram.wait_for(lambda: len(telegram.final_text(5)) == 2)
    note, help_text = telegram.final_text(5)
    assert note == "我目前只能读文字，所以看不到你发的贴纸。"
    assert help_text.startswith(HELP_ZH) and LANGUAGE_LINE_ZH in help_text


async def test_a_language_choice_on_telegram_survives_a_restart(
        telegram: TelegramEmulator, store: SqlStore, generator: ScriptedGenerator,
        settings: Settings) -> None:
    for text, seen in (("/language en", 1), ("/help", 2)):  # the second after a restart
        async with DialogueManager(store=store, generator=generator, settings=settings,
                                   commands=builtin_commands()) as manager, \
                telegram_adapter(telegram, manager):
            telegram.push_text(text, chat=6, user=6, language="zh-CN")
            await telegram.wait_for(lambda n=seen: len(telegram.final_text(6)) == n)
    chosen, help_text = telegram.final_text(6)
    assert chosen == "From now on I speak English with you."
    assert help_text.startswith("Commands:")


async def test_a_long_chinese_reply_with_emoji_fits_telegrams_utf16_limit(
        telegram: TelegramEmulator, manager: DialogueManager,
        generator: ScriptedGenerator) -> None:
    text = CHINESE * 300  # about 12,000 UTF-16 code units: the emoji take two each
    generator.reply = lambda _messages: text
    async with telegram_adapter(telegram, manager):
        telegram.push_text("讲个长故事", chat=7, user=7, language="zh-CN")
        await telegram.wait_for(lambda: not manager.active_conversations
                                and len(telegram.final_text(7)) > 2, timeout=30)
    parts = telegram.final_text(7)
    assert all(_utf16(part) <= 4096 for part in parts)
    assert all(part.endswith("。") for part in parts)
    # Formatted: the Markdown marks became entities, and every character arrived.
    assert "".join(parts) == text.replace("**", "").replace("`", "")
    entities = [m["entities"] for _id, m in sorted(telegram.messages.items())
                if m["chat"] == 7]
    assert all({e["type"] for e in found} == {"b", "code"} for found in entities)
    assert entities[0][0]["offset"] == 18  # counted in UTF-16: the emoji before it is two


# Discord.

@pytest.fixture
async def discord() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        yield emulator


async def test_discord_commands_are_described_in_chinese_for_chinese_clients(
        discord: DiscordEmulator, manager: DialogueManager) -> None:
    async with discord_adapter(discord, manager):
        pass
    [sync] = discord.calls("PUT", "/commands")
    commands = {c["name"]: c for c in sync.body}  # type: ignore[union-attr]
    assert set(commands) == {c.name for c in builtin_commands()}
    helped = commands["help"]
    assert helped["description"] == "list the commands"
    assert helped["description_localizations"]["zh-CN"] == "列出所有命令"
    assert helped["description_localizations"]["zh-TW"] == "列出所有命令"
    assert "fr" not in helped["description_localizations"]
    [option] = commands["language"]["options"]
    assert option["description_localizations"]["zh-CN"] == "en、zh，或 'default'（跟随你的应用）"
    assert [c["value"] for c in option["choices"]] == ["en", "zh", "default"]
    assert "name_localizations" not in helped or not helped["name_localizations"]


async def test_a_discord_user_with_a_chinese_client_gets_chinese(
        discord: DiscordEmulator, manager: DialogueManager) -> None:
    picture = {"id": "1", "filename": "cat.png", "size": 10, "url": "http://x/cat.png",
               "proxy_url": "http://x/cat.png"}
    async with discord_adapter(discord, manager):
        token = discord.interact("help", author=8, dm=True, locale="zh-CN")
        await discord.wait_for(lambda: len(discord.interaction_replies[token]) >= 2)
        # A message carries no locale: the one of the user's last slash command stands.
        discord.post("", author=8, dm=True, attachments=[picture])
        channel = discord.dm_channel(8)
        await discord.wait_for(lambda: len(discord.channel_texts(channel)) == 1)
        english = discord.interact("stop", author=9, dm=True, locale="en-US")
        await discord.wait_for(lambda: len(discord.interaction_replies[english]) >= 2)
    answer = discord.interaction_replies[token][1]["content"]
    assert answer.startswith(HELP_ZH) and LANGUAGE_LINE_ZH in answer
    assert discord.channel_texts(channel) == ["我目前只能读文字，所以看不到你发的附件。"]
    assert discord.interaction_replies[english][1]["content"] == \
        "There is no reply of yours being written here to stop."
