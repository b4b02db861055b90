"""The two ways generation refuses or fails, each one line for the user."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input: one line for the user (exit status 2 in the scripts), raised before anything heavy starts."""


class GenerationError(Exception):
    """Generation failed in a way the user can act on; the message says how (exit status 1 in the scripts)."""
