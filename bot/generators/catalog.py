"""The models a chat may choose (``/model``): their names, kinds and what each loads.

``CHINWAG_MODELS`` names them, ``name=kind:model`` separated by commas::

    smol=transformers:builtin, classic=seq2seq:data/models/seq2seq-english, remote=openai:qwen2.5-7b

``CHINWAG_GENERATOR`` and ``CHINWAG_MODEL`` are always the entry named ``default``: what a
chat that chose nothing (or chose a name no longer configured) is answered by. Two names
for the same kind and model are one model: loaded once, counting tokens alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_NAME = "default"
KINDS = ("transformers", "seq2seq", "openai", "echo")
IN_PROCESS_KINDS = frozenset({"transformers", "seq2seq"})
"""Kinds that hold a model in this process's memory: ``CHINWAG_MAX_LOADED_MODELS`` bounds
these. A client of another server, or the echo generator, costs next to nothing."""
DEFAULT_MODEL = "builtin"
"""The model of an entry written ``name=kind`` with no ``:model``."""
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    kind: str
    """One of ``KINDS``: ``CHINWAG_GENERATOR``'s values."""
    model: str
    """What ``CHINWAG_MODEL`` would be for it: ``builtin``, a folder, a hub id, a served name."""

    @property
    def in_process(self) -> bool:
        return self.kind in IN_PROCESS_KINDS

    @property
    def identity(self) -> tuple[str, str]:
        """What is loaded: entries alike in it share one generator and one token count."""
        return self.kind, self.model


def parse_entries(text: str) -> tuple[ModelEntry, ...]:
    """``CHINWAG_MODELS`` as entries, in the order written; raises ``ValueError`` with a
    line that names what is wrong. Names are case-insensitive (kept lowercase)."""
    entries: list[ModelEntry] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, equals, spec = (part.strip() for part in item.partition("="))
        if not equals or not spec:
            raise ValueError(f"{item!r} is not of the form name=kind:model")
        name = name.lower()
        if not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a model name (up to 32 letters, digits, "
                             "'-', '_' and '.', starting with a letter or digit)")
        if name == DEFAULT_NAME:
            raise ValueError(f"the name {DEFAULT_NAME!r} is taken: it is CHINWAG_GENERATOR "
                             "with CHINWAG_MODEL")
        if any(entry.name == name for entry in entries):
            raise ValueError(f"{name!r} is named twice")
        kind, _, model = (part.strip() for part in spec.partition(":"))
        if kind not in KINDS:
            raise ValueError(f"{name}: the kind {kind!r} is not one of {', '.join(KINDS)}")
        model = model or DEFAULT_MODEL
        if kind == "openai" and model == DEFAULT_MODEL:
            raise ValueError(f"{name}: name the model the server serves (openai:NAME)")
        entries.append(ModelEntry(name, kind, model))
    return tuple(entries)


@dataclass(frozen=True)
class ModelCatalog:
    """Every configured model, the default first."""

    default: ModelEntry
    others: tuple[ModelEntry, ...] = ()

    @classmethod
    def parse(cls, text: str, default: ModelEntry) -> ModelCatalog:
        return cls(default, parse_entries(text))

    def __iter__(self) -> Iterator[ModelEntry]:
        yield self.default
        yield from self.others

    def __len__(self) -> int:
        return 1 + len(self.others)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self)

    def get(self, name: str | None) -> ModelEntry | None:
        """The entry of this name (any case); ``None`` for an unknown one."""
        wanted = DEFAULT_NAME if name is None else name.lower()
        return next((entry for entry in self if entry.name == wanted), None)

    def resolve(self, name: str | None) -> ModelEntry:
        """The entry a chat that chose ``name`` is answered by: the default when it chose
        none, or a name no longer configured."""
        return self.get(name) or self.default

    def recorded(self, entry: ModelEntry) -> str | None:
        """What is stored of the model that counted some tokens: its name, or ``None`` for
        the default's model (so one model's deployment stores nothing more)."""
        return None if entry.identity == self.default.identity else entry.name

    def counts_alike(self, counted_by: str | None, entry: ModelEntry) -> bool:
        """Whether a count made by the model named ``counted_by`` (``None``: the default,
        as every count stored before models could be chosen) holds for ``entry``."""
        counter = self.get(counted_by)
        return counter is not None and counter.identity == entry.identity
