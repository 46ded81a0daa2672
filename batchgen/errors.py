"""The one base of the errors a user acts on: a message, a hint of what to do next, and the
exit code `batchgen` ends with. Library code raises them; only cli.py turns them into exit
codes and text."""

from __future__ import annotations

EXIT_FAILED = 1  # some jobs failed, or verify found a mismatch
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 75  # sysexits' EX_TEMPFAIL: another run holds the folder; try again later


class BatchgenError(Exception):
    """What went wrong, in a sentence that names the file, field or option; `hint` is what
    to do next."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def report(self) -> str:
        """The message as the command line prints it."""
        return f"{self.message}\n    hint: {self.hint}" if self.hint else self.message


class BadInputError(BatchgenError):
    """Input that is not the recipe's fault but still the user's to fix (e.g. `--device`)."""
