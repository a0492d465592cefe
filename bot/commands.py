"""Commands, defined once and run on every platform: registry, parsing, access checks."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from bot.errors import CommandError
from bot.events import IncomingMessage
from bot.i18n import Language, Translator

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.generators.pool import ModelPool, TokenCounting
    from bot.memory import Memory
    from bot.store import Conversation, Store

_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@(\S+))?(?:\s+(.*))?$", re.DOTALL)


class Access(Enum):
    EVERYONE = "everyone"
    ADMIN_IN_GROUPS = "admin in groups"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Argument:
    name: str
    description: str
    """English, marked with ``N_``: translated where it is shown."""
    required: bool = False
    rest: bool = False
    """Takes the rest of the line, spaces included (only the last argument)."""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandContext:
    message: IncomingMessage
    args: Mapping[str, str]
    conversation: Conversation
    is_admin: bool
    store: Store
    settings: Settings
    tokens: TokenCounting
    """Counts tokens as the conversation's model does (or the nearest loaded one)."""
    registry: CommandRegistry
    language: Language
    """The caller's language, and how it was chosen."""
    tr: Translator
    """The caller's language's texts: answers and ``CommandError``s are written in it."""
    stop_reply: Callable[[], bool] = lambda: False
    """Stops the reply being generated in this conversation, if the caller may (its
    asker, or an admin); returns whether one was stopped."""
    memory: Memory | None = None
    """Long-term memory, when it is on."""
    models: ModelPool | None = None
    """The models chats may choose (``/model``)."""


Handler = Callable[[CommandContext], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    description: str
    """English, marked with ``N_``: translated where it is shown."""
    handler: Handler
    arguments: tuple[Argument, ...] = ()
    access: Access = Access.EVERYONE

    @property
    def usage(self) -> str:
        shown = [f"<{a.name}>" if a.required else f"[{a.name}]" for a in self.arguments]
        return " ".join([f"/{self.name}", *shown])


@dataclass(frozen=True, slots=True)
class CommandCall:
    """A message that is a command: ``/name[@bot] [arguments]``."""

    name: str
    addressed_to: str | None
    argument_text: str


def parse_call(text: str) -> CommandCall | None:
    """A command only when the message starts with ``/name``; text that merely contains a
    command word is not one."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    return CommandCall(match.group(1).lower(), match.group(2), (match.group(3) or "").strip())


@dataclass
class CommandRegistry:
    _commands: dict[str, Command] = field(default_factory=dict)

    def add(self, command: Command) -> None:
        if command.name in self._commands:
            raise ValueError(f"command /{command.name} is defined twice")
        if any(a.rest for a in command.arguments[:-1]):
            raise ValueError(f"/{command.name}: only the last argument can take the rest")
        self._commands[command.name] = command

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)


def parse_arguments(command: Command, text: str, tr: Translator) -> dict[str, str]:
    """Bind ``text`` to the command's arguments, or raise ``CommandError`` with its usage."""
    values: dict[str, str] = {}
    rest = text.strip()
    for argument in command.arguments:
        if not rest:
            if argument.required:
                needs = tr.gettext("/{command} needs <{argument}>. Usage: {usage}")
                raise CommandError(needs.format(command=command.name, argument=argument.name,
                                                usage=command.usage))
            continue
        if argument.rest:
            value, rest = rest, ""
        else:
            value, _, rest = rest.partition(" ")
            rest = rest.strip()
        if argument.choices and value.lower() not in argument.choices:
            wrong = tr.gettext("{argument} must be one of {choices} (got {value!r}). "
                               "Usage: {usage}")
            raise CommandError(wrong.format(argument=argument.name, value=value,
                                            choices=", ".join(argument.choices),
                                            usage=command.usage))
        values[argument.name] = value.lower() if argument.choices else value
    if rest:
        raise CommandError(
            tr.gettext("Too many arguments. Usage: {usage}").format(usage=command.usage))
    return values


def needs_admin(command: Command, message: IncomingMessage) -> bool:
    """Whether running this command here depends on the author being an admin."""
    if command.access is Access.EVERYONE:
        return False
    return not (command.access is Access.ADMIN_IN_GROUPS and message.is_direct)


def may_run(command: Command, message: IncomingMessage, is_admin: bool) -> bool:
    """The one place where command access is decided."""
    return is_admin or not needs_admin(command, message)
