"""Exceptions for user mistakes: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class ReclipError(Exception):
    """Base class of every error caused by user input (config, data, paths, checkpoints)."""


class DataError(ReclipError):
    """Bad dataset: missing files or columns, too many undecodable rows. The message names the file/row/column."""


class CheckpointError(ReclipError):
    """A checkpoint or exported model that cannot be loaded safely."""
