"""The kit's error types, in a module that imports nothing, so any module can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or key is invalid (the message says which and what is allowed)."""


class MetricError(ValueError):
    """A solution or submission table that cannot be scored (names the problem, counts and examples)."""
