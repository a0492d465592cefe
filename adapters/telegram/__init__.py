"""Telegram through python-telegram-bot: direct messages, groups and forum topics."""

import os

# Opt in to python-telegram-bot's time periods as timedelta (its announced default); without
# it PTB 22 warns from inside its own RetryAfter whenever flood control is hit.
os.environ.setdefault("PTB_TIMEDELTA", "true")

from adapters.telegram.adapter import TelegramAdapter
from adapters.telegram.normalize import normalize

__all__ = ["TelegramAdapter", "normalize"]
