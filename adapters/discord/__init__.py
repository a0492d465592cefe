"""Discord through discord.py: servers, threads, direct messages and slash commands."""

from adapters.discord.adapter import DiscordAdapter
from adapters.discord.normalize import normalize

__all__ = ["DiscordAdapter", "normalize"]
