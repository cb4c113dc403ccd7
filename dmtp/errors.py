"""Errors a user can hit. The CLI prints them as one line and exits non-zero; anything else is a bug."""


class DmtpError(Exception):
    """A problem with the user's input or environment: say what, where, and what to do."""

    exit_code = 2


class StoreError(DmtpError):
    """A store is missing, torn, made with other parameters, or fails a check."""


class InputDataError(DmtpError):
    """A prompts/documents file is missing or malformed (the message names file and line)."""


class ModelLoadError(DmtpError):
    """A base model or head cannot be found, fetched or loaded."""
