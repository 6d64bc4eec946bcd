"""Errors the training job raises on purpose; the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every deliberate training-job error; the message says what to fix."""


class ConfigError(TrainerError, ValueError):
    """The config file is unreadable, has an unknown key, a wrong type or an inconsistent value."""


class DataError(TrainerError, ValueError):
    """The data cannot be used: missing label column, non-numeric feature, too few rows to split."""


class ExportError(TrainerError):
    """Export failed: parity check over tolerance, or the output version already exists."""
