"""The commands every Chinwag has: help, reset, persona, settings, listen, language, stats,
forget, memory, block; and model, where several models are configured."""

from __future__ import annotations

from collections.abc import Sequence

from bot.commands import Access, Argument, Command, CommandContext, CommandRegistry
from bot.errors import CommandError
from bot.generators.catalog import DEFAULT_NAME
from bot.i18n import LANGUAGES, N_, NAMES, Source, choose, translator
from bot.store import Role

_DEFAULT_WORDS = ("default", "reset", "clear")
_SETTING_NAMES = ("temperature", "max_reply_tokens")
MEMORY_SHOWN_CHARS = 300
"""``/memory`` shows this much of each recalled turn."""
MENU_CHOICES = 25
"""Model names offered as a menu (Discord's most); with more, the name is typed."""
_HELP_LINES = {
    Access.EVERYONE: N_("{usage} — {description}"),
    Access.ADMIN: N_("{usage} — {description} (admins)"),
    Access.ADMIN_IN_GROUPS: N_("{usage} — {description} (admins in groups)"),
}


async def _help(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    lines = [_("Commands:")]
    for command in ctx.registry:
        lines.append(_(_HELP_LINES[command.access]).format(
            usage=command.usage, description=_(command.description)))
    if ctx.models is not None and len(ctx.models.catalog) > 1:
        lines.append(_("Models: {names} (/model <name> picks one for this chat).").format(
            names=", ".join(ctx.models.catalog.names)))
    if not ctx.message.is_direct:
        lines.append(_("In groups I answer when you mention me or reply to me."))
    return "\n".join(lines)


async def _reset(ctx: CommandContext) -> str:
    await ctx.store.reset(ctx.conversation.id)
    return ctx.tr.gettext("Context cleared: I start fresh from your next message. "
                          "The history is kept; /forget deletes what is stored about you.")


async def _persona(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    text = ctx.args.get("text")
    if text is None:
        current = ctx.conversation.persona
        if current is None:
            return _("Persona (default): {persona}").format(
                persona=ctx.settings.default_system_prompt(ctx.tr))
        return _("Persona: {persona}").format(persona=current)
    if text.lower() in _DEFAULT_WORDS:
        await ctx.store.set_persona(ctx.conversation.id, None)
        return _("Persona reset to the default.")
    limit = ctx.settings.context_tokens // 4
    if ctx.tokens.count_tokens("system", text) > limit:
        raise CommandError(_("That persona is too long: keep it under about {limit} tokens.")
                           .format(limit=limit))
    await ctx.store.set_persona(ctx.conversation.id, text)
    return _("Persona set. It applies from the next message.")


def _parse_setting(name: str, value: str, ctx: CommandContext) -> float | int:
    _ = ctx.tr.gettext
    try:
        if name == "temperature":
            number: float | int = float(value)
            if not 0.0 <= number <= 2.0:
                raise ValueError
        else:
            number = int(value)
            top = ctx.settings.context_tokens // 2
            if not 16 <= number <= top:
                raise CommandError(_("max_reply_tokens must be between 16 and {top}.")
                                   .format(top=top))
    except ValueError:
        wrong = _("temperature must be a number from 0 to 2 (got {value!r}).") \
            if name == "temperature" else \
            _("max_reply_tokens must be a whole number (got {value!r}).")
        raise CommandError(wrong.format(value=value)) from None
    return number


async def _settings(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    conversation = ctx.conversation
    name, value = ctx.args.get("name"), ctx.args.get("value")
    if name is not None:
        if value is None:
            raise CommandError(_("Give a value: /settings {name} <value> (or 'default').")
                               .format(name=name))
        temperature, max_reply = conversation.temperature, conversation.max_reply_tokens
        parsed = None if value.lower() in _DEFAULT_WORDS else _parse_setting(name, value, ctx)
        if name == "temperature":
            temperature = None if parsed is None else float(parsed)
        else:
            max_reply = None if parsed is None else int(parsed)
        await ctx.store.set_generation(conversation.id, temperature, max_reply)
        if parsed is None:
            return _("{name} set to the default for this conversation.").format(name=name)
        return _("{name} set to {value} for this conversation.").format(name=name,
                                                                        value=parsed)
    values: list[tuple[str, float | int | None, float | int]] = [
        ("temperature", conversation.temperature, ctx.settings.temperature),
        ("max_reply_tokens", conversation.max_reply_tokens, ctx.settings.max_reply_tokens)]
    lines = [_("Settings for this conversation:")]
    for setting, own, default in values:
        line = _("{name} = {value} (default)") if own is None else _("{name} = {value}")
        lines.append(line.format(name=setting, value=default if own is None else own))
    lines.append(_("Change one with /settings <name> <value>, or 'default' to go back."))
    return "\n".join(lines)


async def _stats(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    stats = await ctx.store.stats()

    def ms(value: float | None) -> str:
        return _("n/a") if value is None else _("{seconds:.2f} s").format(seconds=value / 1000)

    return _(
        "Conversations: {conversations}\n"
        "Users: {users}\n"
        "Messages: {user_messages} from users, {replies} replies\n"
        "Tokens: {prompt_tokens} prompt, {reply_tokens} reply\n"
        "Reply time: p50 {p50}, p95 {p95}"
    ).format(conversations=stats.conversations, users=stats.users,
             user_messages=stats.user_messages, replies=stats.replies,
             prompt_tokens=stats.prompt_tokens, reply_tokens=stats.reply_tokens,
             p50=ms(stats.latency_ms_p50), p95=ms(stats.latency_ms_p95))


async def _listen(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    mode = ctx.args.get("mode")
    if ctx.message.is_direct:
        return _("In a direct chat I answer every message anyway.")
    if mode is None:
        if ctx.conversation.answer_all:
            return _("Here I answer every message. /listen on|off changes it.")
        return _("Here I answer mentions and replies. /listen on|off changes it.")
    await ctx.store.set_answer_all(ctx.conversation.id, mode == "on")
    if mode == "on":
        return _("From now on I answer every message here.")
    return _("From now on I answer here only when mentioned or replied to.")


async def _stop(ctx: CommandContext) -> str:
    if ctx.stop_reply():
        return ctx.tr.gettext("Stopped.")
    return ctx.tr.gettext("There is no reply of yours being written here to stop.")


async def _forget(ctx: CommandContext) -> str:
    message = ctx.message
    deleted = await ctx.store.forget_user(message.platform, message.author_id)
    if ctx.memory is not None:  # their embeddings went with their messages; copies too
        ctx.memory.forgotten()
    return ctx.tr.ngettext(
        "Done: I deleted {count} stored message (yours and my replies to you) "
        "and everything else I kept about you.",
        "Done: I deleted {count} stored messages (yours and my replies to you) "
        "and everything else I kept about you.", deleted).format(count=deleted)


async def _memory(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    if ctx.memory is None:
        return _("Long-term memory is off here; the operator turns it on with "
                 "CHINWAG_MEMORY=on.")
    message = ctx.message
    last = await ctx.memory.last_recall(ctx.conversation.id, message.author_id)
    if last is None or not last.turns:
        return _("Nothing from earlier in this conversation was recalled for your last "
                 "message.")
    lines = [_("Recalled for your last message, most relevant first (similarity, who "
               "said it):")]
    for turn in last.turns:
        said = turn.message
        who = _("me") if said.role is Role.ASSISTANT else \
            _("you") if said.author_id == message.author_id else _("another user")
        text = said.text if len(said.text) <= MEMORY_SHOWN_CHARS \
            else said.text[:MEMORY_SHOWN_CHARS].rstrip() + "…"
        lines.append(_("{similarity:.2f} — {who}: {text}").format(
            similarity=turn.similarity, who=who, text=text))
    return "\n".join(lines)


async def _language(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    choice = ctx.args.get("language")
    message = ctx.message
    if choice is None:
        how = {Source.CHOSEN: _("you chose it with /language"),
               Source.PLATFORM: _("your app is set to it"),
               Source.DEFAULT: _("the bot's default")}[ctx.language.source]
        return _("I speak {language} with you ({how}). /language en or /language zh "
                 "changes it; /language default follows your app again.").format(
            language=NAMES[ctx.language.code], how=how)
    if choice in _DEFAULT_WORDS:
        await ctx.store.set_language(message.platform, message.author_id, None)
        now = choose(None, ctx.language.platform, ctx.settings.language)
        if now.source is Source.PLATFORM:
            answer = translator(now.code).gettext(
                "From now on I follow your app's language: {language}.")
        else:  # not told their app's language, or one Chinwag does not speak
            answer = translator(now.code).gettext(
                "From now on I follow your app's language; as I do not know it or do not "
                "speak it, I use the bot's default: {language}.")
        return answer.format(language=NAMES[now.code])
    await ctx.store.set_language(message.platform, message.author_id, choice)
    # Said in the language just chosen: the first thing they read in it.
    return translator(choice).gettext("From now on I speak {language} with you.").format(
        language=NAMES[choice])


async def _model(ctx: CommandContext) -> str:
    _ = ctx.tr.gettext
    if ctx.models is None:
        return _("Only one model answers here.")
    catalog, chosen = ctx.models.catalog, ctx.conversation.model
    name = ctx.args.get("name")
    if name is None:
        current = catalog.resolve(chosen)
        lines = [_("Models (/model <name> picks one for this chat, /model default goes "
                   "back):")]
        for entry in catalog:
            line = _("{name} — {kind}: {model} (answers here)") if entry == current \
                else _("{name} — {kind}: {model}")
            lines.append(line.format(name=entry.name, kind=entry.kind, model=entry.model))
        if chosen is not None and catalog.get(chosen) is None:
            lines.append(_("This chat chose {name}, which is no longer configured, so the "
                           "default model answers.").format(name=chosen))
        return "\n".join(lines)
    picked = catalog.get(name)
    if picked is None:
        raise CommandError(_("There is no model {name!r} here. The models: {names}.").format(
            name=name, names=", ".join(catalog.names)))
    await ctx.store.set_model(ctx.conversation.id,
                              None if picked.name == DEFAULT_NAME else picked.name)
    answer = _("From the next message on, {name} answers here ({kind}: {model}).").format(
        name=picked.name, kind=picked.kind, model=picked.model)
    if picked.in_process and not ctx.models.is_loaded(picked):
        answer += " " + _("It is loaded then, so that reply takes a little longer.")
    return answer


def _target(ctx: CommandContext) -> tuple[str, str]:
    user = ctx.args["user"].lstrip("@")
    platform, sep, user_id = user.partition(":")
    if not sep:
        platform, user_id = ctx.message.platform, user
    if not platform or not user_id:
        raise CommandError(ctx.tr.gettext("Name the user as <user id> or <platform:user id>."))
    return platform, user_id


async def _block(ctx: CommandContext) -> str:
    platform, user_id = _target(ctx)
    if ctx.settings.is_admin(f"{platform}:{user_id}"):
        raise CommandError(ctx.tr.gettext("Admins cannot be blocked."))
    await ctx.store.set_blocked(platform, user_id, True)
    return ctx.tr.gettext("Blocked {user}: I will ignore their messages.").format(
        user=f"{platform}:{user_id}")


async def _unblock(ctx: CommandContext) -> str:
    platform, user_id = _target(ctx)
    await ctx.store.set_blocked(platform, user_id, False)
    return ctx.tr.gettext("Unblocked {user}.").format(user=f"{platform}:{user_id}")


def builtin_commands(models: Sequence[str] = ()) -> CommandRegistry:
    """Every built-in command; descriptions are English, translated where shown.
    ``models``: the names chats may choose (``ModelCatalog.names``); ``/model`` is there
    when there are several."""
    registry = CommandRegistry()
    user = Argument("user", N_("a user id, or platform:user_id"), required=True)
    for command in (
        Command("help", N_("list the commands"), _help),
        Command("reset", N_("start a fresh context (history is kept)"), _reset),
        Command("stop", N_("stop the reply being written"), _stop),
        Command("persona", N_("show or set this conversation's system prompt"), _persona,
                (Argument("text", N_("the new persona, or 'default'"), rest=True),),
                Access.ADMIN_IN_GROUPS),
        Command("settings", N_("show or change temperature and max_reply_tokens"), _settings,
                (Argument("name", N_("the setting to change"), choices=_SETTING_NAMES),
                 Argument("value", N_("its new value, or 'default'"))),
                Access.ADMIN_IN_GROUPS),
        Command("listen", N_("answer every message in this channel, or only mentions"),
                _listen, (Argument("mode", N_("on or off"), choices=("on", "off")),),
                Access.ADMIN_IN_GROUPS),
        Command("language", N_("show or choose the language I speak with you"), _language,
                (Argument("language", N_("en, zh, or 'default' to follow your app"),
                          choices=(*LANGUAGES, "default")),)),
        Command("stats", N_("usage figures"), _stats, access=Access.ADMIN),
        Command("forget", N_("delete everything stored about you"), _forget),
        Command("memory", N_("show what I recalled from earlier for your last message"),
                _memory),
        Command("block", N_("ignore a user"), _block, (user,), Access.ADMIN),
        Command("unblock", N_("stop ignoring a user"), _unblock, (user,), Access.ADMIN),
    ):
        registry.add(command)
    if len(models) > 1:
        registry.add(Command(
            "model", N_("show the models, or choose the one that answers in this chat"),
            _model, (Argument("name", N_("a model's name, or 'default'"),
                              choices=tuple(models) if len(models) <= MENU_CHOICES else ()),),
            Access.ADMIN_IN_GROUPS))
    return registry
