"""A loopback Discord emulator: the gateway (websocket) and the REST calls the real
discord.py client makes, recording every request, with faults that tests inject."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from tests.auxil.loopback import start, wait_until

APP_ID = "900000000000000001"
BOT_USER = {"id": "900000000000000002", "username": "chinwag", "discriminator": "0",
            "global_name": "Chinwag", "avatar": None, "bot": True}
GUILD = "800000000000000001"
BOT_ROLE = "700000000000000009"
"""The role Discord makes for a bot when it joins a server; people's clients offer it
when they type the bot's name, so users mention it meaning the bot."""
CHANNEL = "800000000000000010"
MANAGE_GUILD = 1 << 5
EVERYONE_PERMISSIONS = 0x0000_0000_0006_4C40  # view, send, read history, embed, attach


def user(user_id: int | str, name: str | None = None) -> dict[str, Any]:
    return {"id": str(user_id), "username": name or f"user{user_id}", "discriminator": "0",
            "global_name": name or f"user{user_id}", "avatar": None}


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any]
    status: int = 200


@dataclass
class Fault:
    status: int
    retry_after: float = 0.0


DROP = 0
"""A fault's status that closes the connection instead of answering."""


@dataclass
class DiscordEmulator:
    token: str = "discord-test-token"
    port: int = 0
    """Where to listen; 0 picks a free port (a test that starts the bot first fixes one)."""
    names: dict[int, str] = field(default_factory=dict)
    """Display names users chose (default ``user<id>``)."""
    refuse_message_content: bool = False
    requests: list[Request] = field(default_factory=list)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every message the bot created, as it stands now (after edits)."""
    interaction_replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per interaction token: what the bot answered (callbacks, edits, follow-ups)."""
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    admins: set[str] = field(default_factory=set)
    """Members holding a role with Manage Server."""
    identified: int = 0
    resumed: int = 0
    heartbeat_ms: int = 1000
    heartbeats: int = 0
    _faults: dict[str, list[Fault]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(10**17))
    _seq: int = 0
    _events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    _socket: web.WebSocketResponse | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    url: str = ""

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/gateway"

    async def __aenter__(self) -> DiscordEmulator:
        self.channels.setdefault(CHANNEL, {"id": CHANNEL, "type": 0, "name": "general",
                                           "guild_id": GUILD, "position": 0,
                                           "permission_overwrites": []})
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner, self.port = await start(app, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        assert self._runner is not None
        await self._runner.cleanup()

    # What tests do.
    def add_channel(self, channel_id: str, *, thread_of: str | None = None) -> str:
        if thread_of is None:
            self.channels[channel_id] = {"id": channel_id, "type": 0, "name": f"c{channel_id}",
                                         "guild_id": GUILD, "position": len(self.channels),
                                         "permission_overwrites": []}
        else:
            self.channels[channel_id] = {
                "id": channel_id, "type": 11, "name": f"t{channel_id}", "guild_id": GUILD,
                "parent_id": thread_of, "owner_id": "1", "message_count": 0,
                "member_count": 1, "rate_limit_per_user": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                    "archive_timestamp": _now(), "locked": False}}
        if self._ready.is_set():
            kind = "THREAD_CREATE" if thread_of else "CHANNEL_CREATE"
            self.dispatch(kind, self.channels[channel_id])
        return channel_id

    async def ready(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        await asyncio.wait_for(self._ready.wait(), timeout)

    def member(self, author: dict[str, Any]) -> dict[str, Any]:
        roles = ["700000000000000002"] if author["id"] in self.admins else []
        if author["id"] == BOT_USER["id"]:
            roles = [BOT_ROLE]
        return {"user": author, "roles": roles, "joined_at": _now(), "deaf": False,
                "mute": False, "flags": 0}

    def post(self, content: str, *, author: int = 1, channel: str | None = CHANNEL,
             dm: bool = False, mention: bool = False, reply_to: str | None = None,
             attachments: list[dict[str, Any]] | None = None, bot_author: bool = False,
             kind: int = 0, mention_roles: list[str] | None = None,
             before_mention: str = "") -> str:
        """A user's message arrives over the gateway; returns its id. With ``mention``,
        the content starts ``<before_mention><@bot> ``."""
        message_id = str(next(self._ids))
        who = user(author, self.names.get(author))
        if bot_author:
            who = BOT_USER if author == 0 else {**who, "bot": True}
        channel_id = f"dm{author}" if dm else channel
        assert channel_id is not None
        if mention:
            content = f"{before_mention}<@{BOT_USER['id']}> {content}"
        payload: dict[str, Any] = {
            "id": message_id, "channel_id": channel_id, "author": who, "content": content,
            "timestamp": _now(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [BOT_USER] if mention else [],
            "mention_roles": mention_roles or [], "attachments": attachments or [],
            "embeds": [], "pinned": False, "type": kind,
        }
        if dm:
            channel_id = self._dm_channel(author)
            payload["channel_id"] = channel_id
        else:
            payload["guild_id"] = GUILD
            payload["member"] = {k: v for k, v in self.member(who).items() if k != "user"}
        if reply_to is not None:
            payload["type"] = 19
            payload["message_reference"] = {"message_id": reply_to,
                                            "channel_id": payload["channel_id"]}
            referenced = self.messages.get(reply_to)
            if referenced is not None:
                payload["referenced_message"] = referenced
                payload["mentions"] = [*payload["mentions"], referenced["author"]]
        self.dispatch("MESSAGE_CREATE", payload)
        return message_id

    def interact(self, name: str, options: dict[str, str] | None = None, *, author: int = 1,
                 channel: str = CHANNEL, dm: bool = False, locale: str = "en-US") -> str:
        """A slash command arrives from a client set to ``locale``; returns the interaction
        token."""
        token = f"itoken{next(self._ids)}"
        who = user(author, self.names.get(author))
        data: dict[str, Any] = {
            "id": str(next(self._ids)), "application_id": APP_ID, "type": 2, "token": token,
            "version": 1, "locale": locale, "entitlements": [],
            "authorizing_integration_owners": {},
            "attachment_size_limit": 10 * 1024 * 1024,
            "app_permissions": str((1 << 53) - 1),
            "data": {"id": str(next(self._ids)), "name": name, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v}
                                 for k, v in (options or {}).items()]},
        }
        if dm:
            channel_id = self._dm_channel(author)
            data.update(user=who, channel_id=channel_id, context=1,
                        channel={"id": channel_id, "type": 1, "recipients": [who]})
        else:
            permissions = EVERYONE_PERMISSIONS | (MANAGE_GUILD if who["id"] in self.admins
                                                  else 0)
            data.update(guild_id=GUILD, channel_id=channel, context=0,
                        channel=self.channels[channel],
                        member={**self.member(who), "permissions": str(permissions)})
        self.interaction_replies[token] = []
        self.dispatch("INTERACTION_CREATE", data)
        return token

    def fail(self, method: str, path_part: str, status: int, *, times: int = 1,
             retry_after: float = 0.0) -> None:
        """The next ``times`` requests whose path contains ``path_part`` fail so."""
        self._faults.setdefault(f"{method} {path_part}", []).extend(
            Fault(status, retry_after) for _ in range(times))

    async def drop_connection(self) -> None:
        """Close the gateway socket the way a network fault does (the client resumes)."""
        assert self._socket is not None
        self._ready.clear()
        await self._socket.close(code=4000, message=b"dropped by the test")

    def channel_texts(self, channel_id: str) -> list[str]:
        return [m["content"] for m in self.messages.values() if m["channel_id"] == channel_id]

    def calls(self, method: str, path_part: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        await wait_until(predicate, timeout, lambda: "requests: "
                         f"{[(r.method, r.path) for r in self.requests][-20:]}")

    def dm_channel(self, author: int) -> str:
        return self._dm_channel(author)

    # The gateway.
    def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self._events.append((self._seq, event, data))
        if self._socket is not None and not self._socket.closed and (
                self._ready.is_set() or event in {"READY", "GUILD_CREATE", "RESUMED"}):
            asyncio.get_running_loop().create_task(self._socket.send_str(json.dumps(
                {"op": 0, "t": event, "s": self._seq, "d": data})))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket = socket
        await socket.send_str(json.dumps({"op": 10,
                                          "d": {"heartbeat_interval": self.heartbeat_ms}}))
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                break
            payload = json.loads(message.data)
            op, data = payload["op"], payload.get("d")
            if op == 1:
                self.heartbeats += 1
                await socket.send_str(json.dumps({"op": 11}))
            elif op == 2:
                await self._identify(socket, data)
            elif op == 6:
                await self._resume(socket, data)
        return socket

    async def _identify(self, socket: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if data["token"] != self.token:
            await socket.close(code=4004, message=b"Authentication failed.")
            return
        if self.refuse_message_content and data["intents"] & (1 << 15):
            await socket.close(code=4014, message=b"Disallowed intent(s).")
            return
        self.identified += 1
        self._ready.set()
        self.dispatch("READY", {
            "v": 10, "user": BOT_USER, "guilds": [{"id": GUILD, "unavailable": True}],
            "session_id": "session-1", "resume_gateway_url": self.gateway_url,
            "application": {"id": APP_ID, "flags": 0}, "private_channels": [],
            "relationships": [],
        })
        self.dispatch("GUILD_CREATE", self._guild())

    async def _resume(self, socket: web.WebSocketResponse, data: dict[str, Any]) -> None:
        self.resumed += 1
        missed = [e for e in self._events if e[0] > int(data["seq"])]
        for seq, event, payload in missed:
            await socket.send_str(json.dumps({"op": 0, "t": event, "s": seq, "d": payload}))
        self._ready.set()
        self.dispatch("RESUMED", {})

    def _guild(self) -> dict[str, Any]:
        channels = [c for c in self.channels.values() if c["type"] != 11]
        threads = [c for c in self.channels.values() if c["type"] == 11]
        return {
            "id": GUILD, "name": "Test server", "owner_id": "1", "icon": None,
            "features": [], "member_count": 3, "large": False, "unavailable": False,
            "joined_at": _now(), "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0,
            "premium_tier": 0, "preferred_locale": "en-US", "system_channel_flags": 0,
            "emojis": [], "stickers": [], "voice_states": [], "presences": [],
            "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
            "roles": [
                {"id": GUILD, "name": "@everyone", "permissions": str(EVERYONE_PERMISSIONS),
                 "position": 0, "color": 0, "hoist": False, "managed": False,
                 "mentionable": False, "flags": 0},
                {"id": "700000000000000002", "name": "mods",
                 "permissions": str(EVERYONE_PERMISSIONS | MANAGE_GUILD), "position": 1,
                 "color": 0, "hoist": False, "managed": False, "mentionable": True,
                 "flags": 0},
                {"id": BOT_ROLE, "name": "Chinwag", "permissions": str(EVERYONE_PERMISSIONS),
                 "position": 2, "color": 0, "hoist": False, "managed": True,
                 "mentionable": True, "flags": 0, "tags": {"bot_id": BOT_USER["id"]}},
            ],
            "channels": channels, "threads": threads,
            "members": [self.member(BOT_USER)],
        }

    def _dm_channel(self, author: int) -> str:
        channel_id = f"5{author:017d}"
        self.channels.setdefault(channel_id, {"id": channel_id, "type": 1,
                                              "recipients": [user(author)]})
        return channel_id

    # REST.
    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body: dict[str, Any] = {}
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
            else:
                form = await request.post()
                body = json.loads(str(form.get("payload_json", "{}")))
        if request.headers.get("Authorization") not in {f"Bot {self.token}", None}:
            self.requests.append(Request(request.method, path, body, 401))
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        for key, faults in self._faults.items():
            method, part = key.split(" ", 1)
            if faults and method == request.method and part in path:
                fault = faults.pop(0)
                self.requests.append(Request(request.method, path, body, fault.status))
                if fault.status == DROP:  # the connection breaks without an answer
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response()
                if fault.status == 429:
                    return _json(
                        {"message": "You are being rate limited.",
                         "retry_after": fault.retry_after, "global": False},
                        status=429, headers={"Via": "1.1 google", "X-RateLimit-Scope": "user"})
                return _json({"message": "Server error", "code": 0},
                                         status=fault.status)
        self.requests.append(Request(request.method, path, body))
        try:
            result = self._route(request.method, path, body)
        except UnknownMessage:
            return _json({"message": "Unknown Message", "code": 10008}, status=404)
        if result is None:
            return web.Response(status=204)
        return _json(result)

    def _route(self, method: str, path: str, body: dict[str, Any]) -> Any:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return BOT_USER
        if path == "/oauth2/applications/@me":
            return {"id": APP_ID, "name": "Chinwag", "icon": None, "description": "",
                    "bot_public": True, "bot_require_code_grant": False, "verify_key": "k",
                    "owner": user(1), "flags": 0}
        if path in {"/gateway", "/gateway/bot"}:
            return {"url": self.gateway_url, "shards": 1, "session_start_limit": {
                "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}}
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            return [{**command, "id": str(next(self._ids)), "application_id": APP_ID,
                     "version": "1", "type": command.get("type", 1),
                     "default_member_permissions": command.get("default_member_permissions")}
                    for command in body] if isinstance(body, list) else []
        if parts[0] == "channels" and parts[-1] == "typing":
            return None
        if parts[0] == "channels" and len(parts) == 2 and method == "GET":
            return {"last_message_id": None, **self.channels[parts[1]]}
        if parts[0] == "channels" and parts[2:3] == ["messages"]:
            if method == "POST":
                return self._create(parts[1], body)
            if parts[3] not in self.messages and method in {"PATCH", "DELETE"}:
                raise UnknownMessage(parts[3])
            if method == "PATCH":
                return self._edit(parts[3], body)
            if method == "DELETE":
                del self.messages[parts[3]]
                return None
        if parts[0] == "interactions" and parts[-1] == "callback":
            self.interaction_replies.setdefault(parts[2], []).append(
                {"kind": "callback", **body})
            flags = (body.get("data") or {}).get("flags", 0)
            return {"interaction": {"id": parts[1], "type": 2,
                                    "response_message_loading": body.get("type") == 5,
                                    "response_message_ephemeral": bool(flags & 64)},
                    "resource": {"type": body.get("type", 5)}}
        if parts[0] == "webhooks":
            token = parts[2]
            if method == "PATCH":
                self.interaction_replies.setdefault(token, []).append({"kind": "edit", **body})
                return self._message(str(next(self._ids)), CHANNEL, body.get("content", ""))
            if method == "POST":
                self.interaction_replies.setdefault(token, []).append(
                    {"kind": "followup", **body})
                return self._message(str(next(self._ids)), CHANNEL, body.get("content", ""))
        raise AssertionError(f"emulator does not implement {method} {path}")

    def _message(self, message_id: str, channel_id: str, content: str) -> dict[str, Any]:
        return {"id": message_id, "channel_id": channel_id, "author": BOT_USER,
                "content": content, "timestamp": _now(), "edited_timestamp": None,
                "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
                "attachments": [], "embeds": [], "pinned": False, "type": 0}

    def _create(self, channel_id: str, body: dict[str, Any]) -> dict[str, Any]:
        content = body.get("content", "")
        assert 0 < len(content) <= 2000, f"Discord refuses {len(content)} characters"
        message = self._message(str(next(self._ids)), channel_id, content)
        message["_allowed_mentions"] = body.get("allowed_mentions")
        message["_reference"] = body.get("message_reference")
        self.messages[message["id"]] = message
        return message

    def _edit(self, message_id: str, body: dict[str, Any]) -> dict[str, Any]:
        message = self.messages[message_id]
        if "content" in body:
            assert 0 < len(body["content"]) <= 2000
            message["content"] = body["content"]
        message["_allowed_mentions"] = body.get("allowed_mentions",
                                                message["_allowed_mentions"])
        return message


class UnknownMessage(LookupError):
    """Discord's 404 for a message that is not there (deleted, or never sent)."""


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None
          ) -> web.Response:
    # Exactly "application/json", as Discord sends it: discord.py compares the header as is.
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


def _now() -> str:
    return datetime.now(UTC).isoformat()
