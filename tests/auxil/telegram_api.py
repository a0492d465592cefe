"""A loopback Telegram Bot API emulator: enough of the API for the real python-telegram-bot
client, recording every call. Tests push updates and read what the bot sent."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOT = {"id": 999, "is_bot": True, "first_name": "Chinwag", "username": "chinwag_bot"}


@dataclass
class ApiCall:
    method: str
    params: dict[str, Any]


@dataclass
class TelegramEmulator:
    token: str = "123456:TEST-TOKEN"
    calls: list[ApiCall] = field(default_factory=list)
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _update_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def __aenter__(self) -> TelegramEmulator:
        app = web.Application()
        app.router.add_post("/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    # What tests do.
    def push_text(self, text: str, *, chat: int = 1, user: int = 1, chat_type: str = "private",
                  reply_to: dict[str, Any] | None = None, thread: int | None = None,
                  entities: list[dict[str, Any]] | None = None) -> int:
        message_id = next(self._message_ids)
        message: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()), "text": text,
            "chat": {"id": chat, "type": chat_type,
                     **({"first_name": f"user{user}"} if chat_type == "private"
                        else {"title": f"group {chat}"})},
            "from": {"id": user, "is_bot": False, "first_name": f"user{user}"},
        }
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if thread is not None:
            message["message_thread_id"] = thread
            message["is_topic_message"] = True
        if entities:
            message["entities"] = entities
        elif text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": len(text.split()[0])}]
        self._updates.append({"update_id": next(self._update_ids), "message": message})
        self._changed.set()
        return message_id

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == method]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls: {[c.method for c in self.calls]}")
            await asyncio.sleep(0.02)

    def final_text(self, chat: int) -> list[str]:
        """The text of each bot message in a chat, after all edits."""
        texts: dict[int, str] = {}
        for call in self.calls:
            if str(call.params.get("chat_id")) != str(chat):
                continue
            if call.method == "sendMessage":
                texts[call.params["_message_id"]] = call.params["text"]
            elif call.method == "editMessageText":
                texts[int(call.params["message_id"])] = call.params["text"]
        return [texts[k] for k in sorted(texts)]

    # The API.
    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        params: dict[str, Any] = dict(await request.post())
        for key, value in list(params.items()):
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    params[key] = json.loads(value)
                except ValueError:
                    pass
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            self.calls.append(ApiCall(method, params))
            return self._error(400, f"emulator does not implement {method}")
        result = await handler(params)
        self.calls.append(ApiCall(method, params))
        return web.Response(text=json.dumps({"ok": True, "result": result}),
                            content_type="application/json")

    @staticmethod
    def _error(code: int, description: str) -> web.Response:
        return web.Response(status=code, content_type="application/json", text=json.dumps(
            {"ok": False, "error_code": code, "description": description}))

    async def _api_getMe(self, params: dict[str, Any]) -> Any:
        return BOT

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_setMyCommands(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_sendChatAction(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset", 0) or 0)
        timeout = float(params.get("timeout", 0) or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates and timeout:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(timeout, 1.0))
            except TimeoutError:
                pass
        return self._updates[:100]

    def _bot_message(self, params: dict[str, Any], message_id: int) -> dict[str, Any]:
        return {"message_id": message_id, "date": int(time.time()), "text": params["text"],
                "chat": {"id": int(params["chat_id"]), "type": "private"}, "from": BOT}

    async def _api_sendMessage(self, params: dict[str, Any]) -> Any:
        message_id = next(self._message_ids)
        params["_message_id"] = message_id
        return self._bot_message(params, message_id)

    async def _api_editMessageText(self, params: dict[str, Any]) -> Any:
        return self._bot_message(params, int(params["message_id"]))
