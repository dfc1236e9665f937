"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class FtpipeError(Exception):
    """Base class: the message must say what is wrong and how to fix it."""


class ConfigError(FtpipeError):
    """A config file or option is invalid."""


class CheckpointError(FtpipeError):
    """A checkpoint cannot be read or does not fit the backbone."""


class DataError(FtpipeError):
    """Input data is missing, malformed or inconsistent."""


class TrainError(FtpipeError):
    """Training cannot proceed (empty split, NaN features, memory budget, ...)."""
