"""Exception types for problems a user can fix. The CLI prints these in one line (no traceback);
anything else is a bug and keeps its traceback. Each also subclasses the matching builtin."""

from __future__ import annotations


class QToolkitError(Exception):
    """Base of every user-facing qtoolkit error."""


class ConfigError(QToolkitError, ValueError):
    """An invalid value in a model config, recipe option, or command-line argument."""


class UnknownNameError(QToolkitError, KeyError):
    """A name (quantizer, preset, recipe) that is not registered; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PolicyError(QToolkitError, ValueError):
    """A policy that does not validate or does not fit the model."""


class CheckpointError(QToolkitError, ValueError):
    """A file that cannot be used as a qtoolkit checkpoint; the message names the file."""


class DataError(QToolkitError, RuntimeError):
    """Data that cannot be loaded; the message says what to do."""


class TrainingDiverged(QToolkitError, RuntimeError):
    """A non-finite loss; the run stopped before applying the update."""


class InsufficientMemory(QToolkitError, MemoryError):
    """A run whose estimated peak memory does not fit the device even at the smallest setting it may
    choose by itself; the message names the options that would make it fit."""


class ConversionError(QToolkitError, ValueError):
    """A model that cannot be imported or exported as asked (an architecture, option or layer format
    the other side lacks); the message names the field or layer."""


class OutputError(QToolkitError, ValueError):
    """An output path that would destroy something the user has: an input of the same command, a
    checkpoint replaced by another kind of file, a directory where a file belongs."""


class RunDirBusy(QToolkitError, RuntimeError):
    """A run directory that another process is writing into (it holds the directory's lock)."""


def short_repr(value: object, limit: int = 80) -> str:
    """`repr(value)` bounded in depth, width and length, for error messages: a value read from a
    hostile file (a YAML alias bomb expands to billions of items) must not be rendered whole."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
