"""The error a user can act on: what went wrong and what to do about it, shown without a traceback.

Raised where the cause is known (a bad value, a missing file, an unreachable
service, a refused deployment, a run that failed); the `fedge` command catches
it once, prints its two lines and exits non-zero (`fedge --debug` shows the
traceback as well).
"""

from __future__ import annotations


class UserError(Exception):
    """`message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
