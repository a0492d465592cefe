"""A loopback Telegram Bot API emulator: enough of the API for the real python-telegram-bot
client, checked the way Telegram checks it (HTML entities, message length, edits that change
nothing), recording every call, with faults that tests inject.

Updates go out by ``getUpdates``, or, once ``setWebhook`` is called, POSTed to the webhook
as Telegram's Bot API server does (``WebhookActor`` in tdlib/telegram-bot-api): one chat's
updates one at a time, the next only after a 2xx answer; chats at once up to
``max_connections``; a non-2xx answer or a broken connection POSTs the same update again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from tests.auxil.loopback import start, wait_until

BOT = {"id": 999, "is_bot": True, "first_name": "Chinwag", "username": "chinwag_bot"}
MAX_TEXT = 4096
_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "code", "pre", "a",
         "tg-spoiler", "span", "blockquote", "tg-emoji"}


_TAG = re.compile(r"</?[a-z][a-z-]*(?:\s[^<>]*)?>")
_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")


class EntityError(ValueError):
    pass


def utf16_len(text: str) -> int:
    """Length as Telegram counts it: UTF-16 code units (an emoji outside the BMP is two)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


_USERNAME = r"[A-Za-z0-9_]{5,32}"
_AUTO_ENTITIES = re.compile(rf"(?<![\w/@])(?:(?P<mention>@{_USERNAME})"
                            rf"|(?P<bot_command>/[A-Za-z0-9_]{{1,64}}(?:@{_USERNAME})?))(?!\w)")


def find_entities(text: str) -> list[dict[str, Any]]:
    """The mentions and bot commands Telegram marks in a user's text, with offsets and
    lengths in UTF-16 code units, as Telegram gives them."""
    return [{"type": match.lastgroup, "offset": utf16_len(text[:match.start()]),
             "length": utf16_len(match.group())} for match in _AUTO_ENTITIES.finditer(text)]


def entity(text: str, part: str, kind: str, **fields: Any) -> dict[str, Any]:
    """An entity of ``kind`` over the first ``part`` in ``text`` (UTF-16 offsets)."""
    start = text.index(part)
    return {"type": kind, "offset": utf16_len(text[:start]), "length": utf16_len(part),
            **fields}


class _TelegramHtml(HTMLParser):
    """Parses HTML as Telegram's parse_mode=HTML does: visible text plus entities."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.entities: list[dict[str, Any]] = []
        self._open: list[tuple[str, int, dict[str, str | None]]] = []

    def _offset(self) -> int:
        return sum(utf16_len(part) for part in self.text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _TAGS:
            raise EntityError(f'Unsupported start tag "{tag}" at byte offset {self._offset()}')
        self._open.append((tag, self._offset(), dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self._open or self._open[-1][0] != tag:
            raise EntityError(f'Unmatched end tag at byte offset {self._offset()}, '
                              f'expected "</{self._open[-1][0] if self._open else ""}>", '
                              f'found "</{tag}>"')
        name, start, attrs = self._open.pop()
        if self._offset() > start:
            entity: dict[str, Any] = {"type": name, "offset": start,
                                      "length": self._offset() - start}
            entity.update({k: v for k, v in attrs.items() if v is not None})
            self.entities.append(entity)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def parse(self, html: str) -> tuple[str, list[dict[str, Any]]]:
        bare = _TAG.sub("", html)
        if "<" in bare:
            raise EntityError(f"Unexpected < at byte offset {bare.index('<')}")
        for match in re.finditer("&", bare):
            if not _ENTITY.match(bare, match.start()):
                raise EntityError(f"Character entity expected at byte offset {match.start()}")
        self.feed(html)
        self.close()
        if self._open:
            raise EntityError(f'Can\'t find end tag corresponding to start tag '
                              f'"{self._open[-1][0]}"')
        return "".join(self.text), sorted(self.entities, key=lambda e: e["offset"])


@dataclass
class ApiCall:
    method: str
    params: dict[str, Any]
    status: int = 200
    at: float = field(default_factory=time.monotonic)
    """When it arrived (``time.monotonic``), to measure how a client spaces its retries."""


DROP = 0
"""A fault's status that closes the connection instead of answering."""
NO_ANSWER = 0
"""A webhook delivery's status when the connection broke or timed out."""
_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ApiRefusal(Exception):
    """A method's refusal with a status of its own (400 is ``ValueError``'s)."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status


@dataclass
class Delivery:
    """One POST of an update to the webhook, and how the bot answered it."""

    update_id: int
    status: int
    """``NO_ANSWER`` when the connection broke or timed out."""
    retry_after: str | None = None
    lost: bool = False
    """The bot answered 2xx but the answer was lost on the way (``lose_webhook_answers``):
    the update is POSTed again."""
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and not self.lost


@dataclass
class Webhook:
    url: str
    secret_token: str
    max_connections: int
    allowed_updates: list[str]


@dataclass
class Fault:
    status: int
    description: str
    retry_after: int | None = None
    html_only: bool = False


@dataclass
class TelegramEmulator:
    token: str = "123456:TEST-TOKEN"
    port: int = 0
    """Where to listen; 0 picks a free port (a test that starts the bot first fixes one)."""
    calls: list[ApiCall] = field(default_factory=list)
    admins: dict[int, set[int]] = field(default_factory=dict)
    """Administrators per group chat, as getChatAdministrators reports them."""
    delay: dict[str, float] = field(default_factory=dict)
    """Seconds each call of a method takes (slow answers)."""
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Every bot message as it stands now: chat, text (visible), entities."""
    offsets: list[int] = field(default_factory=list)
    chat_faults: dict[int, Fault] = field(default_factory=dict)
    """Every call about a chat (by ``chat_id``) fails so while the chat is in here."""
    _faults: dict[str, deque[Fault]] = field(default_factory=dict)
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _update_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    url: str = ""
    webhook: Webhook | None = None
    """Set by ``setWebhook``: updates are POSTed to it, and ``getUpdates`` is refused."""
    deliveries: list[Delivery] = field(default_factory=list)
    """Every POST to the webhook, in the order the answers came."""
    webhook_retry_s: float = 0.05
    """Wait before POSTing an update again after a non-2xx answer (Telegram honours
    ``Retry-After``, recorded in ``deliveries``; tests need not wait that long)."""
    webhook_timeout_s: float = 60.0
    """How long a POST may wait for its answer before it counts as broken."""
    lose_webhook_answers: int = 0
    """The next so many 2xx answers are lost on the way: those updates are POSTed again."""
    _webhook_wake: asyncio.Event = field(default_factory=asyncio.Event)
    _webhook_tasks: dict[Any, asyncio.Task[None]] = field(default_factory=dict)
    """Per queue (a chat), the task POSTing its updates; ``None`` the one starting them."""
    _connections: asyncio.Semaphore = field(default_factory=asyncio.Semaphore)
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> TelegramEmulator:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._handle)
        self._runner, self.port = await start(app, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._stop_webhook()
        if self._session is not None:
            await self._session.close()
        await self._runner.cleanup()

    # What tests do.
    def push_message(self, message: dict[str, Any], kind: str = "message") -> int:
        self.push_update({"update_id": next(self._update_ids), kind: message})
        return int(message.get("message_id", 0))

    def push_update(self, update: dict[str, Any]) -> None:
        """An update as it is (one already sent, again: as if Telegram had lost the bot's
        answer to it)."""
        self._updates.append(update)
        self._changed.set()
        self._webhook_wake.set()

    def user_message(self, *, chat: int = 1, user: int = 1, chat_type: str = "private",
                     language: str | None = None, **fields: Any) -> dict[str, Any]:
        """A message from ``user``, whose app is set to ``language`` (``language_code``)."""
        author: dict[str, Any] = {"id": user, "is_bot": False, "first_name": f"user{user}"}
        if language is not None:
            author["language_code"] = language
        return {
            "message_id": next(self._message_ids), "date": int(time.time()),
            "chat": {"id": chat, "type": chat_type,
                     **({"first_name": f"user{user}"} if chat_type == "private"
                        else {"title": f"group {chat}"})},
            "from": author,
            **fields,
        }

    def push_text(self, text: str, *, chat: int = 1, user: int = 1, chat_type: str = "private",
                  reply_to: dict[str, Any] | None = None, thread: int | None = None,
                  entities: list[dict[str, Any]] | None = None,
                  language: str | None = None) -> int:
        """A user's text message; ``entities`` default to the mentions and commands
        Telegram would find in it."""
        message = self.user_message(chat=chat, user=user, chat_type=chat_type, text=text,
                                    language=language)
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if thread is not None:
            message["message_thread_id"] = thread
            message["is_topic_message"] = True
        entities = find_entities(text) if entities is None else entities
        if entities:
            message["entities"] = entities
        return self.push_message(message)

    def push_mention(self, text: str, *, chat: int, user: int = 1, **kwargs: Any) -> int:
        """``@chinwag_bot <text>`` in a group."""
        handle = f"@{BOT['username']}"
        return self.push_text(f"{handle} {text}", chat=chat, user=user,
                              chat_type=kwargs.pop("chat_type", "supergroup"), **kwargs)

    def bot_message(self, message_id: int, chat: int, chat_type: str = "supergroup"
                    ) -> dict[str, Any]:
        """A bot message as a reply_to_message of a user's update."""
        return {"message_id": message_id, "date": 0, "from": BOT,
                "text": self.messages[message_id]["text"],
                "chat": {"id": chat, "type": chat_type, "title": "g"}}

    def fail(self, method: str, status: int, description: str, *, times: int = 1,
             retry_after: int | None = None, html_only: bool = False) -> None:
        """The next ``times`` calls of ``method`` (with parse_mode=HTML, if ``html_only``)
        fail so."""
        queue = self._faults.setdefault(method, deque())
        queue.extend(Fault(status, description, retry_after, html_only) for _ in range(times))

    def sent(self, method: str = "sendMessage") -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == method and c.status == 200]

    def failed(self, method: str) -> list[ApiCall]:
        return [c for c in self.calls if c.method == method and c.status != 200]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await wait_until(predicate, timeout, lambda: f"calls: {[c.method for c in self.calls]}")

    def chat_messages(self, chat: int) -> list[dict[str, Any]]:
        return [m for _id, m in sorted(self.messages.items()) if m["chat"] == chat]

    def final_text(self, chat: int) -> list[str]:
        """The visible text of each bot message in a chat, after all edits."""
        return [m["text"] for m in self.chat_messages(chat)]

    @property
    def pending_updates(self) -> int:
        return len(self._updates)

    def delivered(self, update_id: int) -> list[Delivery]:
        """Every POST of this update to the webhook, with its answer."""
        return [d for d in self.deliveries if d.update_id == update_id]

    # The API.
    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            self.calls.append(ApiCall(method, {}, 401))
            return self._error(401, "Unauthorized")
        params: dict[str, Any] = dict(await request.post())
        for key, value in list(params.items()):
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    params[key] = json.loads(value)
                except ValueError:
                    pass
        if self.delay.get(method):
            await asyncio.sleep(self.delay[method])
        chat = str(params.get("chat_id", ""))
        chat_fault = self.chat_faults.get(int(chat)) if chat.lstrip("-").isdigit() else None
        if chat_fault is not None:
            self.calls.append(ApiCall(method, params, chat_fault.status))
            return self._error(chat_fault.status, chat_fault.description,
                               chat_fault.retry_after)
        faults = self._faults.get(method)
        if faults and (not faults[0].html_only or params.get("parse_mode") == "HTML"):
            fault = faults.popleft()
            self.calls.append(ApiCall(method, params, fault.status))
            if fault.status == DROP:  # the connection breaks without an answer
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            return self._error(fault.status, fault.description, fault.retry_after)
        handler = getattr(self, f"_api_{method}", None)
        if handler is None:
            self.calls.append(ApiCall(method, params, 400))
            return self._error(400, f"Bad Request: emulator does not implement {method}")
        try:
            result = await handler(params)
        except ApiRefusal as exc:
            self.calls.append(ApiCall(method, params, exc.status))
            return self._error(exc.status, str(exc))
        except EntityError as exc:
            self.calls.append(ApiCall(method, params, 400))
            return self._error(400, f"Bad Request: can't parse entities: {exc}")
        except ValueError as exc:
            self.calls.append(ApiCall(method, params, 400))
            return self._error(400, f"Bad Request: {exc}")
        self.calls.append(ApiCall(method, params))
        return web.Response(text=json.dumps({"ok": True, "result": result}),
                            content_type="application/json")

    @staticmethod
    def _error(code: int, description: str, retry_after: int | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
        return web.Response(status=code, content_type="application/json", text=json.dumps(body))

    async def _api_getMe(self, params: dict[str, Any]) -> Any:
        return BOT

    async def _api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        await self._stop_webhook()
        self.webhook = None
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self._updates.clear()
        return True

    async def _api_setWebhook(self, params: dict[str, Any]) -> Any:
        url = str(params.get("url", ""))
        if not url:
            return await self._api_deleteWebhook(params)
        parts = urlsplit(url)
        # Telegram POSTs only to https; loopback http stands for a --local Bot API server.
        if not (parts.scheme == "https" or (parts.scheme == "http"
                                            and parts.hostname in _LOOPBACK)):
            raise ValueError("bad webhook: An HTTPS URL must be provided for webhook")
        secret = str(params.get("secret_token", ""))
        if secret and not _SECRET_TOKEN.fullmatch(secret):
            raise ValueError("secret token contains unallowed characters")
        connections = int(params.get("max_connections", 40) or 40)
        if not 1 <= connections <= 100:
            raise ValueError("max_connections must be between 1 and 100")
        await self._stop_webhook()
        if str(params.get("drop_pending_updates", "")).lower() == "true":
            self._updates.clear()
        self.webhook = Webhook(url, secret, connections,
                               list(params.get("allowed_updates") or []))
        self._connections = asyncio.Semaphore(connections)
        self._webhook_tasks[None] = asyncio.create_task(self._post_updates())
        return True

    async def _api_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        hook = self.webhook
        info: dict[str, Any] = {"url": hook.url if hook else "", "has_custom_certificate": False,
                                "pending_update_count": len(self._updates)}
        if hook is not None:
            info.update(max_connections=hook.max_connections)
            if hook.allowed_updates:
                info.update(allowed_updates=hook.allowed_updates)
        failed = [d for d in self.deliveries if not d.ok]
        if failed:
            info.update(last_error_date=int(time.time()),
                        last_error_message=f"Wrong response from the webhook: {failed[-1].status}")
        return info

    async def _api_setMyCommands(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_sendChatAction(self, params: dict[str, Any]) -> Any:
        return True

    async def _api_getChatAdministrators(self, params: dict[str, Any]) -> Any:
        chat = int(params["chat_id"])
        return [{"status": "creator", "is_anonymous": False,
                 "user": {"id": user, "is_bot": False, "first_name": f"user{user}"}}
                for user in sorted(self.admins.get(chat, ()))]

    async def _api_getUpdates(self, params: dict[str, Any]) -> Any:
        if self.webhook is not None:
            raise ApiRefusal(409, "Conflict: can't use getUpdates method while webhook is "
                                  "active; use deleteWebhook to delete the webhook first")
        offset = int(params.get("offset", 0) or 0)
        timeout = float(params.get("timeout", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        self.offsets.append(offset)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        if not self._updates and timeout:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(timeout, 1.0))
            except TimeoutError:
                pass
        return self._updates[:limit]

    # The webhook.
    async def _post_updates(self) -> None:
        """Start POSTing each chat's updates, as updates come."""
        while self.webhook is not None:
            self._webhook_wake.clear()
            allowed = self.webhook.allowed_updates
            if allowed:  # Telegram keeps no update of a kind not asked for
                self._updates = [u for u in self._updates if _kind(u) in allowed]
            for update in self._updates:
                queue = _queue(update)
                if queue not in self._webhook_tasks:
                    self._webhook_tasks[queue] = asyncio.create_task(self._post_queue(queue))
            await self._webhook_wake.wait()

    async def _post_queue(self, queue: Any) -> None:
        """One chat's updates, in order: the next only after a 2xx answer."""
        try:
            while self.webhook is not None:
                update = next((u for u in self._updates if _queue(u) == queue), None)
                if update is None:
                    return
                async with self._connections:
                    delivery = await self._post(self.webhook, update)
                self.deliveries.append(delivery)
                if delivery.ok:
                    self._updates = [u for u in self._updates if u is not update]
                else:
                    await asyncio.sleep(self.webhook_retry_s)
        finally:
            self._webhook_tasks.pop(queue, None)
            self._webhook_wake.set()  # what came for this chat meanwhile starts again

    async def _post(self, hook: Webhook, update: dict[str, Any]) -> Delivery:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json"}
        if hook.secret_token:
            headers["X-Telegram-Bot-Api-Secret-Token"] = hook.secret_token
        try:
            async with self._session.post(
                    hook.url, data=json.dumps(update).encode(), headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.webhook_timeout_s)) as response:
                await response.read()
                delivery = Delivery(update["update_id"], response.status,
                                    response.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError):
            return Delivery(update["update_id"], NO_ANSWER)
        if delivery.ok and self.lose_webhook_answers:
            self.lose_webhook_answers -= 1
            delivery.lost = True
        return delivery

    async def _stop_webhook(self) -> None:
        """Stop POSTing; what was not answered 2xx stays pending."""
        tasks = list(self._webhook_tasks.values())
        self._webhook_tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _render(self, params: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        raw = str(params.get("text", ""))
        if params.get("parse_mode") == "HTML":
            text, entities = _TelegramHtml().parse(raw)
        else:
            text, entities = raw, []
        if not text.strip():
            raise ValueError("message text is empty")
        if len(text.encode("utf-16-le")) // 2 > MAX_TEXT:
            raise ValueError("message is too long")
        return text, entities

    def _result(self, message_id: int) -> dict[str, Any]:
        stored = self.messages[message_id]
        return {"message_id": message_id, "date": int(time.time()), "text": stored["text"],
                "chat": {"id": stored["chat"], "type": "private"}, "from": BOT}

    async def _api_sendMessage(self, params: dict[str, Any]) -> Any:
        text, entities = self._render(params)
        message_id = next(self._message_ids)
        params["_message_id"] = message_id
        self.messages[message_id] = {"chat": int(params["chat_id"]), "text": text,
                                     "entities": entities, "edits": 0}
        return self._result(message_id)

    async def _api_deleteMessage(self, params: dict[str, Any]) -> Any:
        message_id = int(params["message_id"])
        stored = self.messages.get(message_id)
        if stored is None or stored["chat"] != int(params["chat_id"]):
            raise ValueError("message to delete not found")
        del self.messages[message_id]
        return True

    async def _api_editMessageText(self, params: dict[str, Any]) -> Any:
        message_id = int(params["message_id"])
        stored = self.messages.get(message_id)
        if stored is None or stored["chat"] != int(params["chat_id"]):
            raise ValueError("message to edit not found")
        text, entities = self._render(params)
        if (text, entities) == (stored["text"], stored["entities"]):
            raise ValueError("message is not modified: specified new message content and "
                             "reply markup are exactly the same as a current content and "
                             "reply markup of the message")
        stored.update(text=text, entities=entities, edits=stored["edits"] + 1)
        return self._result(message_id)


_MESSAGE_KINDS = ("message", "edited_message", "channel_post", "edited_channel_post")


def _kind(update: dict[str, Any]) -> str:
    return next(key for key in update if key != "update_id")


def _queue(update: dict[str, Any]) -> Any:
    """Telegram's webhook queue: a message's chat (new and edited messages alike), or the
    update alone."""
    kind = _kind(update)
    if kind in _MESSAGE_KINDS:
        return ("chat", update[kind]["chat"]["id"])
    return ("update", update["update_id"])
