"""The errors a user can fix by editing a config or replacing a file: the CLI prints the message and exits with 2."""


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class ModelFileError(ValueError):
    """A model's file that cannot load (truncated, corrupt, not a weights file); the message names the file
    and how to get a good copy."""
