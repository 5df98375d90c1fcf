"""The one exception type for mistakes a user can make (bad config, missing file, bad data).

The CLI prints these as a single line without a traceback; everything else is a bug and keeps its traceback.
"""


class LMStackError(Exception):
    """A user-facing error whose message names the field or file and what was expected."""


class ConfigError(LMStackError):
    """An invalid configuration value, key or file."""
