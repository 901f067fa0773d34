"""User-facing errors.

A `UserError` is a problem with the user's input (a config value, a data file, a
missing directory). `launch.py` prints its message without a traceback and exits 2;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user: the message names the setting or file and what was expected."""


class ConfigError(UserError):
  """An invalid config value, raised before anything is compiled."""


class DataError(UserError):
  """A missing, malformed or inconsistent dataset file or directory."""
