"""Generators: where reply text comes from. One interface, several backends."""

from bot.generators.base import ChatMessage, GenerationParams, Generator

__all__ = ["ChatMessage", "GenerationParams", "Generator"]
