"""The Discord adapter on discord.py: servers, threads, DMs and slash commands, inside
Chinwag's own event loop (``login`` + ``connect``, never ``Client.run``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.gateway import DiscordWebSocket
from discord.http import Route

from adapters.discord.normalize import PLATFORM, is_direct, normalize
from adapters.discord.rate_limits import rate_limit_trace
from adapters.discord.sink import ChannelSink, InteractionSink
from adapters.discord.slash import DescriptionTranslator, add_commands, command_text
from bot.commands import Command, CommandRegistry
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.i18n import N_, SOURCE_LANGUAGE, choose, translator
from bot.intake import OnFailure

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 60.0
RESTARTING_NOTE = N_("I am restarting; try again in a moment.")


class _Gateway(discord.Client):
    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self._adapter = adapter

    async def on_message(self, message: discord.Message) -> None:
        self._adapter.on_message(message)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        # The platform's top-level handler: one bad event never stops the others.
        logger.exception("discord: error while handling %s", event_method)


class DiscordAdapter:
    platform = PLATFORM

    def __init__(self, token: str, manager: DialogueManager, commands: CommandRegistry, *,
                 api_url: str, gateway_url: str, guild_ids: Sequence[int] = (),
                 language: str = SOURCE_LANGUAGE) -> None:
        # discord.py reads its REST base and gateway from class attributes only.
        Route.BASE = api_url.rstrip("/")
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
        # Chinwag never joins voice: no warnings about voice libraries at every start.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        self._token = token
        self._manager = manager
        self._guild_ids = tuple(guild_ids)
        self._language = language
        intents = discord.Intents.default()
        intents.message_content = True
        self._client = _Gateway(self, intents=intents,
                                allowed_mentions=discord.AllowedMentions.none(),
                                http_trace=rate_limit_trace(manager.metrics))
        self._tree: app_commands.CommandTree[Any] = app_commands.CommandTree(self._client)
        self._tree.on_error = self._on_command_error  # type: ignore[method-assign]
        add_commands(self._tree, commands, self._on_command, language)
        self._connection: asyncio.Task[None] | None = None
        self._receiving = False
        self._commands_open = True

    async def __aenter__(self) -> Self:
        try:
            await self._login()
        except BaseException:
            await self._client.close()  # also when start-up is cancelled while it waits
            raise
        self._receiving = True
        self._connection = asyncio.create_task(self._client.connect(reconnect=True),
                                               name="chinwag:discord:gateway")
        ready = asyncio.create_task(self._client.wait_until_ready())
        done, _ = await asyncio.wait([self._connection, ready], timeout=READY_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            error = self._connection.exception() if self._connection in done else None
            await self._close()
            if isinstance(error, discord.PrivilegedIntentsRequired):
                raise ConfigError(
                    "Discord refused the message content intent: enable it for the bot in the "
                    "developer portal (Bot → Privileged Gateway Intents)") from error
            raise DeliveryError(f"cannot connect to the Discord gateway: {error}")
        await self._sync_commands()
        await self._resume()
        assert self._client.user is not None
        logger.info("discord: connected as %s", self._client.user)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._close()

    async def _login(self) -> None:
        """Check the token. A network outage (no connection, 5xx after discord.py's own
        retries, timeouts) is waited out with growing pauses, one warning per try: a bot
        started before its network keeps its place. A refused token is final."""
        delay = 1.0
        while True:
            try:
                await self._client.login(self._token)
                return
            except discord.LoginFailure as exc:
                raise ConfigError("CHINWAG_DISCORD_TOKEN was refused by Discord") from exc
            except (discord.DiscordServerError, aiohttp.ClientError, OSError,
                    TimeoutError) as exc:
                logger.warning("discord: cannot reach the API (%s); retrying in %s s",
                               exc or type(exc).__name__, delay)
                # Each login opens a new HTTP session; close this one, and let the next
                # make its own connection pool (closing the session closed this one).
                await self._client.http.close()
                self._client.http.connector = discord.utils.MISSING
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            except discord.HTTPException as exc:  # refused for good: retrying won't help
                raise DeliveryError(f"the Discord API refused start-up: {exc}") from exc

    async def serve(self) -> None:
        """Until stopped; raises if the gateway connection ends for good."""
        assert self._connection is not None
        await asyncio.shield(self._connection)

    async def stop_receiving(self) -> None:
        """Messages keep flowing to the dialogue manager until the client closes: while it
        stops it stores them for the next start to answer, since Discord never redelivers
        a gateway event. Slash commands get a "restarting" answer."""
        self._commands_open = False

    async def _close(self) -> None:
        self._receiving = False
        await self._client.close()
        if self._connection is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._connection

    async def _sync_commands(self) -> None:
        await self._tree.set_translator(DescriptionTranslator())
        try:
            if self._guild_ids:
                for guild_id in self._guild_ids:
                    guild = discord.Object(guild_id)
                    self._tree.copy_global_to(guild=guild)
                    await self._tree.sync(guild=guild)
            else:
                await self._tree.sync()
        except discord.HTTPException as exc:
            # Commands still work by @mention; say so rather than refuse to start.
            logger.error("discord: could not register slash commands: %s", exc)

    async def _resume(self) -> None:
        """Answer what a stop left unanswered (accepted but not replied to)."""
        pending = await self._manager.pending(PLATFORM)
        for item in pending:
            try:
                channel = self._client.get_channel(int(item.chat_id)) \
                    or await self._client.fetch_channel(int(item.chat_id))
            except discord.HTTPException as exc:
                logger.warning("%s: cannot answer %s left from before the restart: %s",
                               item.conversation_key, item.platform_message_id, exc)
                continue
            if not isinstance(channel, discord.abc.Messageable):
                continue
            incoming = item.as_incoming(PLATFORM, is_direct=is_direct(channel))
            question = discord.PartialMessage(channel=channel,
                                              id=int(item.platform_message_id))
            self._manager.submit(incoming, ChannelSink(channel, question,
                                                       incoming.conversation_key))
        if pending:
            logger.info("discord: answering %s messages left from before the restart",
                        len(pending))

    def on_message(self, message: discord.Message) -> None:
        if not self._receiving or self._client.user is None:
            return
        incoming = normalize(message, self._client.user.id)
        if incoming is None:
            return
        sink = ChannelSink(message.channel, message, incoming.conversation_key)
        # submit() queues before returning, so messages keep their order per channel.
        # Discord never redelivers an event: one the database cannot take now is kept.
        self._manager.submit(incoming, sink, on_failure=OnFailure.RETRY)

    async def _on_command(self, interaction: discord.Interaction, command: Command,
                          options: Mapping[str, str | None]) -> None:
        # Answer within Discord's 3 s at once; the real answer follows, visible to the caller.
        await interaction.response.defer(ephemeral=True, thinking=True)
        locale = interaction.locale.value
        if not self._receiving or not self._commands_open:
            # Said without the database: in the client's language (a /language choice is
            # not looked up for it).
            tr = translator(choose(None, locale, self._language).code)
            await interaction.edit_original_response(content=tr.gettext(RESTARTING_NOTE))
            return
        permissions = interaction.permissions
        incoming = IncomingMessage(
            platform=PLATFORM, chat_id=str(interaction.channel_id),
            author_id=str(interaction.user.id), author_name=interaction.user.display_name,
            message_id=f"interaction-{interaction.id}", text=command_text(command, options),
            is_direct=is_direct(interaction.channel) or interaction.guild_id is None,
            mentions_bot=True,
            author_is_chat_admin=interaction.guild_id is not None
            and permissions.manage_guild,
            language=locale,
        )
        self._manager.submit(incoming, InteractionSink(interaction),
                             on_failure=OnFailure.RETRY)

    async def _on_command_error(self, interaction: discord.Interaction,
                                error: app_commands.AppCommandError) -> None:
        logger.error("discord:%s: slash command failed: %s", interaction.channel_id, error)
