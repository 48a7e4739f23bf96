"""User-facing errors: each says what was wrong, where (file, column, row, option) and what was expected.

The CLI prints ``str(err)`` on one line and exits with status 2; library users catch ``DpnError``.
"""


class DpnError(Exception):
    """Base class of every error that is the user's input, not a bug in dpn-jax."""


class DataError(DpnError, ValueError):
    """A data file, dataset spec or column is missing or malformed."""


class ConfigError(DpnError, ValueError):
    """An unknown model, option or ``--set`` key, or a value of the wrong type."""
