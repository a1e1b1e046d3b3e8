"""The one exception type users can cause.

Every mistake a user can make (bad data, bad flags, bad schedules, a run directory that
already exists) raises :class:`MeanFlowError` with a one-line message that says what was
wrong and how to fix it. The command line prints that line and exits with code 2.
"""

from __future__ import annotations


class MeanFlowError(ValueError):
    """A user-facing error: one clear line, what was wrong and how to fix it."""


def check(condition: object, message: str) -> None:
    """Raise :class:`MeanFlowError` with ``message`` unless ``condition`` holds (is truthy)."""
    if not condition:
        raise MeanFlowError(message)


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` with ``noun`` in the right number: ``1 row``, ``2 rows`` (``nouns``: an irregular
    plural)."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
