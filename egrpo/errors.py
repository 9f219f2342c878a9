"""The errors egrpo answers a user with: each message says what was wrong, where, and what to do."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says where and what to do."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. rewards or gradients stayed non-finite); the last checkpoint is untouched."""
