"""Where the exporter reports long work (the CLI shows it as rich progress bars)."""

from __future__ import annotations

from collections.abc import Callable


class Progress:
    """The default reports nothing; subclasses (the CLI's) draw bars."""

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Start a task of ``total`` units (bytes); returns a function that advances it."""
        return lambda n: None

    def stage(self, description: str) -> None:
        """A step without a measurable size (tracing, checking)."""
