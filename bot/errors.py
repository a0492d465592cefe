"""The one exception tree of Chinwag.

    ChinwagError
    ├── ConfigError            a setting is missing or wrong; the CLI prints one line and exits
    ├── ModelUnavailable       the model cannot be found, read or loaded
    ├── GenerationError        the generator failed while producing a reply
    │   └── Busy               more requests than the generator takes; refused at once
    ├── EncoderError           the long-term memory's sentence encoder failed on some texts
    ├── DeliveryError          a platform refused or failed to take a reply
    ├── StorageError           the database failed
    ├── CommandError           a command was used wrongly; its text goes to the user
    ├── BadRequest             an HTTP client's request ``chinwag serve`` refuses (400)
    └── TrainingError          ``chinwag train``: a corpus cannot be read or used

Third-party errors are converted where they enter (``raise X(...) from exc``) so the
dialogue manager only has to know this tree.
"""


class ChinwagError(Exception):
    """Base of every error Chinwag raises on purpose."""


class ConfigError(ChinwagError):
    """A setting is missing, malformed or points at something unusable."""


class ModelUnavailable(ChinwagError):
    """The configured model cannot be found, read or loaded."""


class GenerationError(ChinwagError):
    """The generator failed while producing a reply."""


class Busy(GenerationError):
    """More requests than the generator takes: refused at once, never queued."""


class EncoderError(ChinwagError):
    """The long-term memory's sentence encoder failed on some texts."""


class DeliveryError(ChinwagError):
    """A platform refused or failed to take a message."""


class StorageError(ChinwagError):
    """The database failed."""


class CommandError(ChinwagError):
    """A command was used wrongly; the message is shown to the user as it is."""


class BadRequest(ChinwagError):
    """A request ``chinwag serve`` refuses, with the message the client gets."""


class TrainingError(ChinwagError):
    """``chinwag train``: a corpus cannot be read, or holds nothing to train on."""
