"""The command registry as Discord application ("slash") commands with typed options."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import discord
from discord import app_commands

from bot.commands import Command, CommandRegistry

Invoke = Callable[[discord.Interaction, Command, Mapping[str, str | None]], Awaitable[None]]


def _option_type(choices: tuple[str, ...], required: bool) -> Any:
    base: Any = Literal.__getitem__(choices) if choices else str  # a fixed list shows as a menu
    return base if required else base | None


def slash_command(command: Command, invoke: Invoke) -> app_commands.Command[Any, Any, None]:
    """One registry command as an application command; ``invoke`` gets its options."""

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
        **{a.name: a.description[:100] for a in command.arguments})(callback)
    return app_commands.Command(name=command.name, description=command.description[:100],
                                callback=described)


def add_commands(tree: app_commands.CommandTree[Any], registry: CommandRegistry,
                 invoke: Invoke) -> None:
    for command in registry:
        tree.add_command(slash_command(command, invoke))


def command_text(command: Command, options: Mapping[str, str | None]) -> str:
    """The options as the text form the dialogue manager parses: ``/name arg …``."""
    values = [options[a.name] for a in command.arguments if options.get(a.name) is not None]
    return " ".join([f"/{command.name}", *(str(v) for v in values)])
