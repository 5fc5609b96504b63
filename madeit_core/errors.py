"""Errors raised for bad input. Every message names the culprit (key, shape, dtype, file)."""

from __future__ import annotations


class MergeInputError(ValueError):
    """A model, checkpoint, bank or argument that cannot be merged as given."""


class BankFormatError(MergeInputError):
    """An expert-bank file that is missing, truncated or corrupted."""
