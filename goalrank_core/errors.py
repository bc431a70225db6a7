"""Errors raised on bad input. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class GoalRankInputError(ValueError):
    """Bad user input: data files, requests, configuration. The message names the problem
    (file, column, first offending row, or config key)."""


class DataValidationError(GoalRankInputError):
    """An impressions, requests or items file breaks the input contract."""


class ConfigError(GoalRankInputError):
    """A configuration has an unknown key or an out-of-range value."""


class DatasetNotFoundError(GoalRankInputError):
    """A named data set is not in the data directory."""
