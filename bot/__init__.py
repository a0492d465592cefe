"""Chinwag: a self-hosted LLM chat bot for Discord, Telegram and the terminal."""

__version__ = "0.1.0"
