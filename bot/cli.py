"""The ``chinwag`` command line: console, run, serve, db upgrade, db downgrade,
model prepare, train seq2seq."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pythonjsonlogger.json import JsonFormatter

from bot import __version__, log_context
from bot.errors import ChinwagError, ConfigError
from bot.seq2seq import command as seq2seq

if TYPE_CHECKING:
    from bot.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chinwag",
        description="A self-hosted LLM chat bot for Discord, Telegram and the terminal. "
                    "Settings come from CHINWAG_* environment variables and .env.",
    )
    parser.add_argument("--version", action="version", version=f"chinwag {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (DEBUG)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("console", help="chat in this terminal (reads standard input)")
    commands.add_parser("run", help="start every adapter whose token is set (console if none)")
    commands.add_parser("serve", help="serve the model as an OpenAI-compatible HTTP endpoint "
                                      "(CHINWAG_SERVE_HOST, CHINWAG_SERVE_PORT)")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION")
    db_commands.add_parser("upgrade", help="apply the database migrations")
    down = db_commands.add_parser("downgrade", help="take the database schema back to an "
                                                    "earlier revision, to run an older release")
    down.add_argument("revision", help="the revision to go back to, e.g. 0004")
    model = commands.add_parser("model", help="the in-process model")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION")
    model_commands.add_parser("prepare", help="convert the configured GGUF models (the built-in "
                                              "one by default) to the cache now, so that the "
                                              "first start is fast (Docker images do it at "
                                              "build time)")
    train = commands.add_parser("train", help="train a model of your own")
    train_commands = train.add_subparsers(dest="train_command", metavar="MODEL")
    seq2seq.add_arguments(train_commands.add_parser(
        "seq2seq", help="a classic seq2seq model with attention (GRU/LSTM), in minutes on a "
                        "CPU; chat with it by CHINWAG_GENERATOR=seq2seq CHINWAG_MODEL=DIR"))
    return parser


class _Redacting(logging.Formatter):
    """Replaces every secret (tokens, API keys, a database password) wherever it shows:
    in messages, their arguments and tracebacks, also those of third-party libraries,
    which may log a URL with a token in it."""

    def __init__(self, fmt: str, secrets: Sequence[str]) -> None:
        super().__init__(fmt)
        self._secrets = [s for s in secrets if len(s) >= 6]

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._secrets)


class _RedactingJson(JsonFormatter):
    """One JSON object a line, secrets blanked as in text logs: also as JSON writes them
    (a password with a quote or a non-ASCII letter is escaped there)."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"levelname": "level", "name": "logger"})
        kept = [s for s in secrets if len(s) >= 6]
        self._secrets = sorted({*kept, *(json.dumps(s)[1:-1] for s in kept)}, key=len,
                               reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self._secrets)


class _AboutFields(logging.Filter):
    """Adds the conversation and message a line is about (``bot.log_context``) as the
    record's ``conversation`` and ``message_id``, for the JSON format's fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        conversation = log_context.conversation.get()
        if conversation is not None:
            record.conversation = conversation
            record.message_id = log_context.message_id.get()
        return True


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def _configure_logging(level: str, secrets: Sequence[str] = (), fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_RedactingJson(secrets))
        handler.addFilter(_AboutFields())
    else:
        handler.setFormatter(_Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                        secrets))
    logging.basicConfig(level=level, handlers=[handler])
    # Their INFO lines are about HTTP requests and model internals, not our conversations.
    for noisy in ("httpx", "transformers", "aiosqlite", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _prepare_models(settings: Settings) -> list[str]:
    """What the first start would spend its time on, done now for every ``transformers``
    model (``CHINWAG_MODEL`` and those in ``CHINWAG_MODELS``): a GGUF model converted to the
    cache, its tokenizer and config loaded (a hub model's downloaded)."""
    from bot.generators.model_files import load_tokenizer, local_weights, resolve

    ready: list[str] = []
    done: set[str] = set()
    for entry in settings.model_catalog():
        if entry.kind != "transformers" or entry.model in done:
            continue
        location = local_weights(resolve(entry.model), settings.model_cache_dir)
        load_tokenizer(entry.model, settings.model_cache_dir)
        done.add(entry.model)
        ready.append(f"model {entry.name} ({entry.model}) is ready: {location}")
    return ready or ["nothing to prepare: no transformers model is configured"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None or (args.command == "db" and args.db_command is None) or (
            args.command == "model" and args.model_command is None) or (
            args.command == "train" and args.train_command is None):
        parser.print_help()
        return 2
    from bot import app
    from bot.config import load_settings

    secrets: Sequence[str] = ()
    try:
        # Training needs only the data folder and the database, and the model it writes
        # may be the one the settings name, not there yet: the generator is not checked.
        settings = load_settings(**{"generator": "echo"} if args.command == "train" else {})
        secrets = settings.secrets()
        level = "DEBUG" if args.verbose else settings.log_level
        # The terminal chat shows only problems; its conversation is the output.
        _configure_logging("WARNING" if args.command == "console" and not args.verbose
                           else level, secrets, settings.log_format)
        if args.command == "console":
            asyncio.run(app.console(settings))
        elif args.command == "run":
            asyncio.run(app.run(settings))
        elif args.command == "serve":
            asyncio.run(app.serve(settings))
        elif args.command == "model":
            print(*_prepare_models(settings), sep="\n")
        elif args.command == "train":
            app.train_seq2seq(settings, seq2seq.from_args(args))
        else:
            revision = asyncio.run(app.downgrade_database(settings, args.revision)
                                   if args.db_command == "downgrade"
                                   else app.upgrade_database(settings))
            print(f"database is at revision {revision}")
    except ConfigError as exc:
        print(f"chinwag: configuration error: {redact(str(exc), secrets)}", file=sys.stderr)
        return 2
    except ChinwagError as exc:
        print(f"chinwag: error: {redact(str(exc), secrets)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
