"""A pickle that would run code when loaded: checkpoint and embedding readers must refuse it."""
from __future__ import annotations


class Payload:
    """Unpickling this would create the marker file: the loader must never let it run."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))
