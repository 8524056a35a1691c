"""The error a user can fix by editing a config: the CLI prints its message and exits with 2."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""
