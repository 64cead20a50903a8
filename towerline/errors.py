"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class TowerlineError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""


class ConfigError(TowerlineError):
    """A config file or override is invalid; the message names the key."""


class DataError(TowerlineError):
    """Input data is missing or malformed; the message names the file and line."""


class ArtifactError(TowerlineError):
    """An artifact is missing, of the wrong kind, corrupt or incompatible."""
