"""Typed exceptions. Every message names the input, what was wrong, and the fix.

The CLI prints ``str(err)`` on one line (plus ``hint``) and exits with ``err.exit_code``;
``--debug`` shows the traceback.
"""
from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line: runtimes (torch, ORT) append multi-line C++ traces."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DeploykitError(Exception):
    """Base class. ``hint`` says how to fix it; ``exit_code`` is what the CLI returns."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\nHINT: {self.hint}" if self.hint else base


class ConfigError(DeploykitError, ValueError):
    """A model/training config field breaks a rule (names the field, the value and the rule)."""

    exit_code = 2


class CheckpointError(DeploykitError):
    """A checkpoint folder is missing, corrupt, pickled, or does not match its config."""

    exit_code = 2


class DataError(DeploykitError):
    """Training/eval data could not be read or is unusable."""

    exit_code = 2


class BackendError(DeploykitError):
    """Unknown backend or scheme, or a backend failed while converting/loading."""

    exit_code = 2


class BackendUnavailable(BackendError):
    """A backend's requirements are not met here (missing package, no GPU, not macOS...)."""

    exit_code = 4


class ArtifactError(DeploykitError):
    """An artifact folder is missing files, its manifest, or was tampered with."""

    exit_code = 2


class ParityError(DeploykitError):
    """A converted artifact differs from the fp32 reference past its declared tolerance."""

    exit_code = 3


class TargetExistsError(DeploykitError):
    """The output folder exists and ``--force`` was not given."""

    exit_code = 2


class FilesystemError(DeploykitError):
    """The machine refused a read or write: permission, read-only or full disk, a busy file.

    Not the user's input and not a plugin's bug: the message names the path and the errno, the hint
    says what to free or change. Raised by ``deploykit.fsutil`` around every write deploykit does.
    """

    exit_code = 5
