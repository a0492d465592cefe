"""Updates by webhook: Telegram POSTs each update to Chinwag's HTTP listener, which answers
200 only once the update's message is stored (or needs no storing), and 503 otherwise so
that Telegram delivers it again: polling's promise (``adapter.py``), kept over HTTP.

Chinwag answers with aiohttp rather than python-telegram-bot's webhook server, which
answers 200 before the update is handled. TLS is a reverse proxy's job (Telegram POSTs only
to HTTPS): the listener speaks plain HTTP on ``CHINWAG_TELEGRAM_WEBHOOK_LISTEN``.

How Telegram's Bot API server delivers (``WebhookActor`` in tdlib/telegram-bot-api), which
the rules here rely on:

* A chat's updates go one at a time, in order: the next only after the one before was
  answered 2xx (or expired, a day after it was sent). Different chats go at once, up to
  ``max_connections``. So a chat's order is Telegram's, and requests are submitted to the
  dialogue manager in the order they arrive.
* A non-2xx answer, or a broken connection, is tried again after the answer's
  ``Retry-After``; without one, at once, then after 2, 4, 8 ... up to 60-120 s. Chinwag
  sends ``Retry-After`` with the waits polling uses (``bot.intake.RETRY_DELAYS_S``).
* At most ``2 × max_connections`` chats are loaded at once: chats held by updates that
  cannot be stored would in the end stop every chat.

So, as in polling (``redelivery.py``), an update that cannot be stored is given up (tried
one last time with ``OnFailure.TELL``: its author is asked to send it again, and it is
answered 200) only on evidence that the database works and only this message fails:
some other update's message was stored since it was first tried. With that evidence it is
given up once it has failed for ``GIVE_UP_S``, or at once when ``max_connections`` chats
are held (the oldest first). During an outage nothing is given up.

The same update delivered again while its intake runs (Telegram timed out waiting) shares
that intake; one delivered again after it was stored is recognised by its message id and
not answered twice. An update that is not JSON with an ``update_id`` is refused (400); one
that is, but that python-telegram-bot cannot read, is answered 200 and logged: another try
would fail the same way and hold up its chat.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Bot, Update
from telegram.error import BadRequest

from adapters.telegram.redelivery import GIVE_UP_S
from bot import intake
from bot.errors import ConfigError
from bot.intake import Intake, OnFailure, Ticket

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_CONNECTIONS = 40
"""Telegram's default: chats delivered to at once (each chat's updates go one at a time)."""
MAX_BODY_BYTES = 1024 * 1024
NOT_TAKING_RETRY_S = 5
"""``Retry-After`` while starting or stopping: about what a restart takes."""
FORGET_AFTER_S = 2 * 86400.0
"""Telegram drops an update a day after its message was sent; its failures are forgotten
after this (an update never delivered again must not count as held forever)."""
CLOSE_TIMEOUT_S = 5.0
"""At close, how long requests still waiting for their intake may take before their
connections are cut (Telegram then delivers those updates again)."""

Dispatch = Callable[[Update, OnFailure], Ticket | None]
"""Submits an update's message; None when it needs no intake."""


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    """The public HTTPS URL Telegram POSTs to; the listener serves its path."""
    host: str
    port: int
    """Where the listener listens (0: any free port)."""
    secret: str = field(repr=False)
    """What Telegram sends in ``X-Telegram-Bot-Api-Secret-Token``."""
    max_connections: int = MAX_CONNECTIONS

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"


@dataclass
class _Failing:
    """An update whose message could not be stored, not answered 2xx since."""

    failed_since: float
    stored_before: int
    """``WebhookRetries.stored`` when it was first tried: more since is the evidence."""
    failures: int = 0


class WebhookRetries:
    """Which updates Telegram delivers again, and when to give one up. No HTTP here."""

    def __init__(self, clock: Callable[[], float], crowded_at: int) -> None:
        self._clock = clock
        self._crowded_at = crowded_at
        self._failing: dict[int, _Failing] = {}
        self.stored = 0
        """Updates whose message was stored since the start: evidence the database works."""

    @property
    def failing(self) -> int:
        return len(self._failing)

    def on_failure(self, update_id: int) -> OnFailure:
        """How to take an update now: one last time (``TELL``) if it is to be given up."""
        failing = self._failing.get(update_id)
        if failing is None or self.stored <= failing.stored_before:
            return OnFailure.REDELIVER
        overdue = self._clock() - failing.failed_since >= GIVE_UP_S
        crowded = len(self._failing) >= self._crowded_at and update_id == min(self._failing)
        return OnFailure.TELL if overdue or crowded else OnFailure.REDELIVER

    def ended(self, update_id: int, outcome: Intake, stored_before: int) -> None:
        """Note how an update's intake ended."""
        now = self._clock()
        if outcome is Intake.STORED:
            self.stored += 1
        if outcome.acknowledge:
            self._failing.pop(update_id, None)
        elif outcome is Intake.FAILED:
            failing = self._failing.setdefault(update_id, _Failing(now, stored_before))
            failing.failures += 1
        for old in [u for u, f in self._failing.items() if now - f.failed_since > FORGET_AFTER_S]:
            del self._failing[old]

    def retry_after(self, update_id: int) -> float:
        failing = self._failing.get(update_id)
        return intake.retry_delay(failing.failures if failing else 1)


@dataclass(frozen=True, slots=True)
class _Running:
    ticket: Ticket
    stored_before: int


class WebhookListener:
    """The HTTP listener: ``start`` (listen, answering 503), ``open`` (take updates),
    ``register`` (``setWebhook``), ``stop_receiving`` (503 again), ``close``."""

    def __init__(self, config: WebhookConfig, bot: Bot, dispatch: Dispatch,
                 allowed_updates: list[str], clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._config = config
        self._bot = bot
        self._dispatch = dispatch
        self._allowed_updates = allowed_updates
        self._retries = WebhookRetries(clock, crowded_at=config.max_connections)
        self._running: dict[int, _Running] = {}
        """Intakes not ended, by update: a delivery again while one runs shares it."""
        self._taking = False
        self._stopped = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = config.port

    async def start(self) -> None:
        """Listen; until ``open``, every update is answered 503."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(self._config.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"CHINWAG_TELEGRAM_WEBHOOK_LISTEN: cannot listen on "
                              f"{self._config.host}:{self._config.port} ({exc.strerror})"
                              ) from exc
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def register(self) -> None:
        """Tell Telegram where to POST (``setWebhook``); pending updates are kept."""
        try:
            await self._bot.set_webhook(
                self._config.url, max_connections=self._config.max_connections,
                allowed_updates=self._allowed_updates, drop_pending_updates=False,
                secret_token=self._config.secret)
        except BadRequest as exc:  # the URL refused: no use trying again
            raise ConfigError(f"CHINWAG_TELEGRAM_WEBHOOK_URL: Telegram refused the webhook "
                              f"({exc.message})") from exc

    def open(self) -> None:
        self._taking = True

    async def serve(self) -> None:
        """Until ``stop_receiving``."""
        await self._stopped.wait()

    def stop_receiving(self) -> None:
        """Take no more updates: every one that comes is answered 503, so Telegram keeps
        it. Requests waiting for their intake still get its answer."""
        self._taking = False
        self._stopped.set()

    async def close(self) -> None:
        self.stop_receiving()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._config.secret.encode()):
            logger.warning("telegram: refused a webhook request from %s without the secret "
                           "token", request.remote)
            return web.Response(status=401)
        body = await request.read()
        if not self._taking:  # checked once the body is in: a stop may come while it is read
            return _later(NOT_TAKING_RETRY_S)
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or type(data.get("update_id")) is not int:
                raise ValueError("not an object with an integer update_id")
        except ValueError as exc:  # the body is not logged: it is a user's message
            logger.warning("telegram: refused a webhook request that is not an update "
                           "(%s bytes): %s", len(body), exc)
            return web.Response(status=400)
        update_id: int = data["update_id"]
        running = self._running.get(update_id)
        if running is None:
            try:
                update = Update.de_json(data, self._bot)
            except Exception:
                logger.exception("telegram: could not read update %s; answering it as "
                                 "handled", update_id)
                return web.Response()
            running = self._submit(update_id, update)
            if running is None:
                return web.Response()  # nothing to store
        else:
            logger.info("telegram: update %s delivered again while it is taken", update_id)
        outcome = await asyncio.shield(running.ticket.accepted)
        if outcome.acknowledge:
            return web.Response()
        if outcome is Intake.CLOSED:
            return _later(NOT_TAKING_RETRY_S)
        return _later(self._retries.retry_after(update_id))

    def _submit(self, update_id: int, update: Update) -> _Running | None:
        ticket = self._dispatch(update, self._retries.on_failure(update_id))
        if ticket is None:
            return None
        running = self._running[update_id] = _Running(ticket, self._retries.stored)
        # Noted once, however many requests wait for it.
        ticket.accepted.add_done_callback(partial(self._ended, update_id, running))
        return running

    def _ended(self, update_id: int, running: _Running,
               accepted: asyncio.Future[Intake]) -> None:
        self._running.pop(update_id, None)
        outcome = Intake.FAILED if accepted.cancelled() else accepted.result()
        self._retries.ended(update_id, outcome, running.stored_before)


def _later(seconds: float) -> web.Response:
    """Not taken: Telegram delivers it again after ``seconds``."""
    return web.Response(status=503, headers={"Retry-After": str(max(1, round(seconds)))})
