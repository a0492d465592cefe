"""The command registry as Discord application ("slash") commands with typed options,
described in ``CHINWAG_LANGUAGE`` and localized for every Discord locale Chinwag speaks
(zh-CN and zh-TW read Chinese, en-US and en-GB English) through discord.py's translator."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import discord
from discord import app_commands

from bot.commands import Command, CommandRegistry
from bot.i18n import SOURCE_LANGUAGE, supported, translator

Invoke = Callable[[discord.Interaction, Command, Mapping[str, str | None]], Awaitable[None]]
MAX_DESCRIPTION = 100


def _described(text: str, language: str) -> app_commands.locale_str:
    """A description in ``language``, carrying its English source for the translator."""
    return app_commands.locale_str(translator(language).gettext(text)[:MAX_DESCRIPTION],
                                   source=text)


class DescriptionTranslator(app_commands.Translator):
    """Command and option descriptions for each locale in a language Chinwag speaks;
    names and choices stay as they are (they are what people type)."""

    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContextTypes) -> str | None:
        source = string.extras.get("source")
        language = supported(locale.value)
        if source is None or language is None:
            return None
        return translator(language).gettext(source)[:MAX_DESCRIPTION]


def _option_type(choices: tuple[str, ...], required: bool) -> Any:
    base: Any = Literal.__getitem__(choices) if choices else str  # a fixed list shows as a menu
    return base if required else base | None


def slash_command(command: Command, invoke: Invoke,
                  language: str = SOURCE_LANGUAGE) -> app_commands.Command[Any, Any, None]:
    """One registry command as an application command, described in ``language``;
    ``invoke`` gets its options."""

    async def callback(interaction: discord.Interaction[Any], /,
                       **options: str | None) -> None:
        await invoke(interaction, command, options)

    parameters = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=discord.Interaction)]
    for argument in command.arguments:
        parameters.append(inspect.Parameter(
            argument.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=_option_type(argument.choices, argument.required),
            default=inspect.Parameter.empty if argument.required else None))
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    described = app_commands.describe(
        **{a.name: _described(a.description, language) for a in command.arguments})(callback)
    return app_commands.Command(name=command.name,
                                description=_described(command.description, language),
                                callback=described)


def add_commands(tree: app_commands.CommandTree[Any], registry: CommandRegistry,
                 invoke: Invoke, language: str = SOURCE_LANGUAGE) -> None:
    for command in registry:
        tree.add_command(slash_command(command, invoke, language))


def command_text(command: Command, options: Mapping[str, str | None]) -> str:
    """The options as the text form the dialogue manager parses: ``/name arg …``."""
    values = [options[a.name] for a in command.arguments if options.get(a.name) is not None]
    return " ".join([f"/{command.name}", *(str(v) for v in values)])
