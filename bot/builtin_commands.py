"""The commands every Chinwag has: help, reset, persona, settings, stats, forget, block."""

from __future__ import annotations

from bot.commands import Access, Argument, Command, CommandContext, CommandRegistry
from bot.errors import CommandError

_DEFAULT_WORDS = ("default", "reset", "clear")
_SETTING_NAMES = ("temperature", "max_reply_tokens")


async def _help(ctx: CommandContext) -> str:
    lines = ["Commands:"]
    for command in ctx.registry:
        mark = {Access.ADMIN: " (admins)", Access.ADMIN_IN_GROUPS: " (admins in groups)"}.get(
            command.access, "")
        lines.append(f"{command.usage} — {command.description}{mark}")
    if not ctx.message.is_direct:
        lines.append("In groups I answer when you mention me or reply to me.")
    return "\n".join(lines)


async def _reset(ctx: CommandContext) -> str:
    await ctx.store.reset(ctx.conversation.id)
    return ("Context cleared: I start fresh from your next message. "
            "The history is kept; /forget deletes what is stored about you.")


async def _persona(ctx: CommandContext) -> str:
    text = ctx.args.get("text")
    if text is None:
        current = ctx.conversation.persona
        if current is None:
            return f"Persona (default): {ctx.settings.system_prompt}"
        return f"Persona: {current}"
    if text.lower() in _DEFAULT_WORDS:
        await ctx.store.set_persona(ctx.conversation.id, None)
        return "Persona reset to the default."
    limit = ctx.settings.context_tokens // 4
    if ctx.generator.count_tokens("system", text) > limit:
        raise CommandError(f"That persona is too long: keep it under about {limit} tokens.")
    await ctx.store.set_persona(ctx.conversation.id, text)
    return "Persona set. It applies from the next message."


def _parse_setting(name: str, value: str, ctx: CommandContext) -> float | int:
    try:
        if name == "temperature":
            number: float | int = float(value)
            if not 0.0 <= number <= 2.0:
                raise ValueError
        else:
            number = int(value)
            top = ctx.settings.context_tokens // 2
            if not 16 <= number <= top:
                raise CommandError(f"max_reply_tokens must be between 16 and {top}.")
    except ValueError:
        expected = "a number from 0 to 2" if name == "temperature" else "a whole number"
        raise CommandError(f"{name} must be {expected} (got {value!r}).") from None
    return number


async def _settings(ctx: CommandContext) -> str:
    conversation = ctx.conversation
    name, value = ctx.args.get("name"), ctx.args.get("value")
    if name is not None:
        if value is None:
            raise CommandError(f"Give a value: /settings {name} <value> (or 'default').")
        temperature, max_reply = conversation.temperature, conversation.max_reply_tokens
        parsed = None if value.lower() in _DEFAULT_WORDS else _parse_setting(name, value, ctx)
        if name == "temperature":
            temperature = None if parsed is None else float(parsed)
        else:
            max_reply = None if parsed is None else int(parsed)
        await ctx.store.set_generation(conversation.id, temperature, max_reply)
        shown = "the default" if parsed is None else str(parsed)
        return f"{name} set to {shown} for this conversation."
    temperature = conversation.temperature
    max_reply = conversation.max_reply_tokens
    return (
        "Settings for this conversation:\n"
        f"temperature = {ctx.settings.temperature if temperature is None else temperature}"
        f"{' (default)' if temperature is None else ''}\n"
        f"max_reply_tokens = {ctx.settings.max_reply_tokens if max_reply is None else max_reply}"
        f"{' (default)' if max_reply is None else ''}\n"
        "Change one with /settings <name> <value>, or 'default' to go back."
    )


async def _stats(ctx: CommandContext) -> str:
    stats = await ctx.store.stats()

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 1000:.2f} s"

    return (
        f"Conversations: {stats.conversations}\n"
        f"Users: {stats.users}\n"
        f"Messages: {stats.user_messages} from users, {stats.replies} replies\n"
        f"Tokens: {stats.prompt_tokens} prompt, {stats.reply_tokens} reply\n"
        f"Reply time: p50 {ms(stats.latency_ms_p50)}, p95 {ms(stats.latency_ms_p95)}"
    )


async def _listen(ctx: CommandContext) -> str:
    mode = ctx.args.get("mode")
    if ctx.message.is_direct:
        return "In a direct chat I answer every message anyway."
    if mode is None:
        state = "every message" if ctx.conversation.answer_all else "mentions and replies"
        return f"Here I answer {state}. /listen on|off changes it."
    await ctx.store.set_answer_all(ctx.conversation.id, mode == "on")
    if mode == "on":
        return "From now on I answer every message here."
    return "From now on I answer here only when mentioned or replied to."


async def _stop(ctx: CommandContext) -> str:
    if ctx.stop_reply():
        return "Stopped."
    return "There is no reply of yours being written here to stop."


async def _forget(ctx: CommandContext) -> str:
    message = ctx.message
    deleted = await ctx.store.forget_user(message.platform, message.author_id)
    return (f"Done: I deleted {deleted} stored messages (yours and my replies to you) "
            "and everything else I kept about you.")


def _target(ctx: CommandContext) -> tuple[str, str]:
    user = ctx.args["user"].lstrip("@")
    platform, sep, user_id = user.partition(":")
    if not sep:
        platform, user_id = ctx.message.platform, user
    if not platform or not user_id:
        raise CommandError("Name the user as <user id> or <platform:user id>.")
    return platform, user_id


async def _block(ctx: CommandContext) -> str:
    platform, user_id = _target(ctx)
    if ctx.settings.is_admin(f"{platform}:{user_id}"):
        raise CommandError("Admins cannot be blocked.")
    await ctx.store.set_blocked(platform, user_id, True)
    return f"Blocked {platform}:{user_id}: I will ignore their messages."


async def _unblock(ctx: CommandContext) -> str:
    platform, user_id = _target(ctx)
    await ctx.store.set_blocked(platform, user_id, False)
    return f"Unblocked {platform}:{user_id}."


def builtin_commands() -> CommandRegistry:
    registry = CommandRegistry()
    user = Argument("user", "a user id, or platform:user_id", required=True)
    for command in (
        Command("help", "list the commands", _help),
        Command("reset", "start a fresh context (history is kept)", _reset),
        Command("stop", "stop the reply being written", _stop),
        Command("persona", "show or set this conversation's system prompt", _persona,
                (Argument("text", "the new persona, or 'default'", rest=True),),
                Access.ADMIN_IN_GROUPS),
        Command("settings", "show or change temperature and max_reply_tokens", _settings,
                (Argument("name", "the setting to change", choices=_SETTING_NAMES),
                 Argument("value", "its new value, or 'default'")),
                Access.ADMIN_IN_GROUPS),
        Command("listen", "answer every message in this channel, or only mentions", _listen,
                (Argument("mode", "on or off", choices=("on", "off")),),
                Access.ADMIN_IN_GROUPS),
        Command("stats", "usage figures", _stats, access=Access.ADMIN),
        Command("forget", "delete everything stored about you", _forget),
        Command("block", "ignore a user", _block, (user,), Access.ADMIN),
        Command("unblock", "stop ignoring a user", _unblock, (user,), Access.ADMIN),
    ):
        registry.add(command)
    return registry
