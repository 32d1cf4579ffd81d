"""User-facing errors: raised for bad input, printed by the CLIs as one line, no traceback."""


class UserError(Exception):
    """Bad input from a user (config, checkpoint, data). The message names the field or path."""


class ConfigError(UserError):
    """A config value is missing, unknown or of the wrong type."""
