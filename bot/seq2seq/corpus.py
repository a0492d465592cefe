"""Dialogue pairs to train on: a prompt and the reply to it.

Sources, as ``chinwag train seq2seq --corpus`` names them:

- ``chatterbot:<language>``: the YAML files of the ``chatterbot-corpus`` package
  (``chatterbot:english``, ``chatterbot:chinese``); each conversation of n turns gives n-1
  pairs (every turn answers the one before it), as ChatterBot itself trains on them, each
  with the turns before its prompt as context (chat shows the model the recent turns);
- a ``.yml``/``.yaml`` file in that format, or a top-level list of ``[prompt, reply]``;
- a ``.tsv`` file: one pair a line, prompt and reply separated by one tab;
- a ``.jsonl`` file: one ``{"prompt": ..., "reply": ...}`` object a line;
- ``db``: the bot's own stored conversations (each user message and the reply to it),
  read by the caller (``bot/app.py``, which alone may use storage) and passed in.

Every reader fails with a ``TrainingError`` that names the file and line or entry.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bot.errors import TrainingError

logger = logging.getLogger(__name__)

DB_CORPUS = "db"
CHATTERBOT_PREFIX = "chatterbot:"


@dataclass(frozen=True, slots=True)
class Pair:
    prompt: str
    reply: str
    context: tuple[str, ...] = ()
    """The conversation's turns before ``prompt``, oldest first (the newest is the bot's)."""

    def turns(self) -> list[tuple[str, str]]:
        """``(role, text)`` oldest first, as chat passes turns to ``encoder_input``: roles
        alternate back from the prompt, the user's turn."""
        texts = [*self.context, self.prompt]
        return [("assistant" if (len(texts) - 1 - i) % 2 else "user", text)
                for i, text in enumerate(texts)]


def load_pairs(corpus: str, stored: Callable[[], Iterable[Pair]] | None = None) -> list[Pair]:
    """The pairs a ``--corpus`` value names. ``stored`` reads the bot's own conversations
    (needed for ``db`` only). Blank prompts or replies are left out."""
    if corpus == DB_CORPUS:
        if stored is None:
            raise TrainingError("--corpus db needs the bot's database, which is not at hand")
        pairs = list(stored())
        where = "the database"
    elif corpus.startswith(CHATTERBOT_PREFIX):
        pairs = chatterbot_pairs(corpus.removeprefix(CHATTERBOT_PREFIX))
        where = corpus
    else:
        path = Path(corpus).expanduser()
        pairs = file_pairs(path)
        where = str(path)
    kept = [p for p in (Pair(p.prompt.strip(), p.reply.strip(),
                             tuple(t.strip() for t in p.context)) for p in pairs)
            if p.prompt and p.reply]
    if not kept:
        raise TrainingError(f"{where} holds no dialogue pairs to train on")
    return kept


def corpus_slug(corpus: str) -> str:
    """A short name for a corpus, for the default output folder (``seq2seq-<slug>``)."""
    if corpus.startswith(CHATTERBOT_PREFIX):
        return corpus.removeprefix(CHATTERBOT_PREFIX)
    if corpus == DB_CORPUS:
        return DB_CORPUS
    return Path(corpus).stem or "corpus"


def chatterbot_languages() -> list[str]:
    return sorted(p.name for p in _chatterbot_data().iterdir() if p.is_dir())


def chatterbot_pairs(language: str) -> list[Pair]:
    folder = _chatterbot_data() / language
    # A name from the list, not a path: "chatterbot:../x" would read (and name the default
    # output folder after) whatever that path leads to.
    if language not in chatterbot_languages():
        raise TrainingError(f"chatterbot-corpus has no language {language!r}; it has "
                            + ", ".join(chatterbot_languages()))
    pairs: list[Pair] = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith((".yml", ".yaml")):
            # The package has a stray malformed entry or two: skip those, not the language.
            pairs += _yaml_pairs(item.read_text(encoding="utf-8"),
                                 f"chatterbot:{language}/{item.name}", strict=False)
    return pairs


def _chatterbot_data() -> Any:
    try:
        return resources.files("chatterbot_corpus") / "data"
    except ModuleNotFoundError:
        raise TrainingError("the chatterbot-corpus package is not installed "
                            "(pip install --no-deps chatterbot-corpus; make setup does)") from None


def file_pairs(path: Path) -> list[Pair]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"cannot read the corpus {path}: {exc}") from exc
    suffix = path.suffix.lower()
    if suffix in {".yml", ".yaml"}:
        return _yaml_pairs(text, str(path))
    if suffix == ".tsv":
        return _tsv_pairs(text, str(path))
    if suffix == ".jsonl":
        return _jsonl_pairs(text, str(path))
    raise TrainingError(f"{path}: a corpus file is .yml, .yaml, .tsv or .jsonl, or say "
                        "chatterbot:<language> or db")


def _yaml_pairs(text: str, where: str, *, strict: bool = True) -> list[Pair]:
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TrainingError(f"{where}: not valid YAML: {exc}") from exc
    if isinstance(document, dict):
        conversations = document.get("conversations")
        if not isinstance(conversations, list):
            raise TrainingError(f"{where}: expected a 'conversations' list (the "
                                "chatterbot-corpus format)")
    elif isinstance(document, list):
        conversations = document
    else:
        raise TrainingError(f"{where}: expected a 'conversations' list or a list of "
                            "[prompt, reply] pairs")
    pairs: list[Pair] = []
    for number, turns in enumerate(conversations, start=1):
        try:
            if not isinstance(turns, list) or len(turns) < 2:
                raise TrainingError(f"{where}: conversation {number} is not a list of two or "
                                    "more turns")
            texts = [_turn_text(turn, where, number) for turn in turns]
        except TrainingError as exc:
            if strict:
                raise
            logger.info("skipping it: %s", exc)
            continue
        pairs += [Pair(texts[i], texts[i + 1], tuple(texts[:i]))
                  for i in range(len(texts) - 1)]
    return pairs


def _turn_text(turn: object, where: str, number: int) -> str:
    # YAML reads a bare `yes` or `42` as a bool or a number; they are still turns of text.
    if isinstance(turn, bool):
        return "yes" if turn else "no"
    if isinstance(turn, str | int | float):
        return str(turn)
    raise TrainingError(f"{where}: conversation {number} has a turn that is not text")


def _tsv_pairs(text: str, where: str) -> list[Pair]:
    pairs: list[Pair] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise TrainingError(f"{where}:{number}: expected a prompt and a reply separated "
                                f"by one tab, found {len(fields)} field(s)")
        pairs.append(Pair(fields[0], fields[1]))
    return pairs


def _jsonl_pairs(text: str, where: str) -> list[Pair]:
    pairs: list[Pair] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{where}:{number}: not valid JSON: {exc.msg}") from exc
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
                or not isinstance(item.get("reply"), str):
            raise TrainingError(f"{where}:{number}: expected an object with text fields "
                                "'prompt' and 'reply'")
        pairs.append(Pair(item["prompt"], item["reply"]))
    return pairs


def split_by_prompt(pairs: Sequence[Pair], held_out: float,
                    seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split into training and held-out pairs so that no prompt is on both sides (the
    corpora repeat a prompt with different replies; splitting pairs would let the model be
    scored on prompts it was trained on). At least one prompt goes to each side when there
    are two or more."""
    prompts = sorted({_key(p.prompt) for p in pairs})
    random.Random(seed).shuffle(prompts)
    count = round(len(prompts) * held_out)
    if len(prompts) >= 2:
        count = min(max(count, 1), len(prompts) - 1)
    chosen = set(prompts[:count])
    train = [p for p in pairs if _key(p.prompt) not in chosen]
    held = [p for p in pairs if _key(p.prompt) in chosen]
    return train, held


def _key(prompt: str) -> str:
    """Prompts that differ only in case, spacing or final punctuation are one prompt."""
    return " ".join(prompt.casefold().split()).rstrip(" ?!.。？！")
