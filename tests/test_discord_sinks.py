"""Discord reply sinks against the loopback emulator, through a real discord.py
interaction: what a sink believes is shown must be what Discord shows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from adapters.discord import DiscordAdapter
from adapters.discord.sink import ORIGINAL, InteractionSink
from bot.builtin_commands import builtin_commands
from bot.dialogue import DialogueManager
from bot.errors import DeliveryError
from bot.events import IncomingMessage, ReplySink
from bot.metrics import Metrics
from tests.auxil.discord_api import DiscordEmulator


class SinkCatcher:
    """Stands in for the dialogue manager: keeps the sink each message would be answered
    through, so the test can drive it."""

    def __init__(self) -> None:
        self.sinks: list[ReplySink] = []
        self.metrics = Metrics()

    async def pending(self, platform: str) -> Sequence[Any]:
        return []

    def submit(self, message: IncomingMessage, sink: ReplySink, **options: Any) -> None:
        self.sinks.append(sink)


async def test_an_interaction_edit_that_failed_is_made_again() -> None:
    catcher = SinkCatcher()
    async with DiscordEmulator() as dc, \
            DiscordAdapter(dc.token, cast(DialogueManager, catcher), builtin_commands(),
                           api_url=dc.api_url, gateway_url=dc.gateway_url):
        await dc.ready()
        token = dc.interact("help")
        await dc.wait_for(lambda: bool(catcher.sinks))
        sink = catcher.sinks[0]
        assert isinstance(sink, InteractionSink)

        def shown() -> list[str]:
            return [r.get("content", "") for r in dc.interaction_replies[token]
                    if r["kind"] == "edit"]

        assert await sink.send("first") == ORIGINAL
        follow_up = await sink.send("more")
        for message_id, before in ((ORIGINAL, "first"), (follow_up, "more")):
            dc.fail("PATCH", "/webhooks/", 400)
            with pytest.raises(DeliveryError):
                await sink.edit(message_id, f"{before}, edited")
            # Discord still shows the old text: the same edit is not skipped as done.
            await sink.edit(message_id, f"{before}, edited")
            assert shown()[-1] == f"{before}, edited"
        patches = [r for r in dc.requests if r.method == "PATCH" and "/webhooks/" in r.path]
        assert [r.status for r in patches] == [200, 400, 200, 400, 200]
