"""Chinese and English: the catalogs the bot's words go through, and which language each
user gets.

Every text the bot says is written in English in the code and marked for extraction:
``N_`` where it is defined apart from where it is said (a note, a command's description),
``gettext``/``ngettext`` of a ``Translator`` where it is said. It is translated when it
is sent, for the person it goes to. Catalogs are gettext ``.mo`` files that Babel
compiles from ``bot/locale/<language>/LC_MESSAGES/chinwag.po`` (``make translations``
extracts, merges and compiles; ``tests/test_i18n.py`` fails when a marked text has no
translation or a ``.mo`` is older than its ``.po``). English is the source language and
needs no catalog.

Which language a user gets (``choose``): the one they chose with ``/language`` (stored with
the user), else their platform's (Telegram's ``language_code``, Discord's interaction
locale), else ``CHINWAG_LANGUAGE``. What the operator reads (logs, the CLI) stays English.
"""

from __future__ import annotations

import gettext
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

from bot.errors import ConfigError

LANGUAGES = ("en", "zh")
"""The languages Chinwag speaks, as stored and as ``CHINWAG_LANGUAGE`` takes them."""
SOURCE_LANGUAGE = "en"
"""The language the texts are written in, in the code."""
DOMAIN = "chinwag"
LOCALE_DIR = Path(__file__).with_name("locale")
NAMES = {"en": "English", "zh": "中文"}
"""Each language's name in itself, as ``/language`` shows it."""


def N_(message: str) -> str:
    """Marks a text for extraction where it is defined; it is translated where it is said."""
    return message


def supported(tag: str | None) -> str | None:
    """The language Chinwag speaks for a platform's language tag: any Chinese (``zh``,
    ``zh-hans``, ``zh-CN``, ``zh_TW``) is ``zh``, any English ``en``; None for the rest."""
    if not tag:
        return None
    primary = tag.strip().replace("_", "-").partition("-")[0].lower()
    return primary if primary in LANGUAGES else None


class Source(StrEnum):
    """How a user's language was decided."""

    CHOSEN = "chosen"
    """With ``/language``."""
    PLATFORM = "platform"
    """From the language their Telegram or Discord app is set to."""
    DEFAULT = "default"
    """``CHINWAG_LANGUAGE``."""


@dataclass(frozen=True, slots=True)
class Language:
    """The language one user gets, and why."""

    code: str
    source: Source
    platform: str | None = None
    """The language the platform says they use, when Chinwag speaks it."""


def choose(chosen: str | None, platform_tag: str | None, default: str) -> Language:
    """A user's language: their ``/language`` choice, else the platform's, else ``default``."""
    platform = supported(platform_tag)
    if chosen is not None and chosen in LANGUAGES:
        return Language(chosen, Source.CHOSEN, platform)
    if platform is not None:
        return Language(platform, Source.PLATFORM, platform)
    return Language(default, Source.DEFAULT)


@dataclass(frozen=True, eq=False, slots=True)
class Translator:
    """The texts of one language."""

    language: str
    catalog: gettext.NullTranslations

    def gettext(self, message: str) -> str:
        return self.catalog.gettext(message)

    def ngettext(self, singular: str, plural: str, n: int) -> str:
        return self.catalog.ngettext(singular, plural, n)

    def translates(self, message: str) -> bool:
        """Whether this language has a text for ``message`` (English has every one).
        A translation identical to its source counts as none: the same text shows."""
        return self.language == SOURCE_LANGUAGE or self.gettext(message) != message


def catalog_path(language: str) -> Path:
    return LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.mo"


@cache
def translator(language: str) -> Translator:
    """The texts of a language in ``LANGUAGES`` (loaded once; catalogs never change while
    Chinwag runs). Raises ``ConfigError`` when its catalog is missing or unreadable."""
    if language not in LANGUAGES:
        raise ValueError(f"Chinwag does not speak {language!r}")
    if language == SOURCE_LANGUAGE:
        return Translator(language, gettext.NullTranslations())
    path = catalog_path(language)
    try:
        with path.open("rb") as file:
            return Translator(language, gettext.GNUTranslations(file))
    except (OSError, ValueError) as exc:  # a missing file; a broken one
        raise ConfigError(f"cannot read the {language} translations ({path}: {exc}); "
                          "run `make translations`") from exc


def load_all() -> None:
    """Load every catalog now, so a missing one stops the start rather than a reply."""
    for language in LANGUAGES:
        translator(language)
