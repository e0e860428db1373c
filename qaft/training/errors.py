"""The error every config check raises: one line, before anything heavy runs."""


class ConfigError(ValueError):
    """A problem with the composed config, reported as one line before anything heavy runs."""
