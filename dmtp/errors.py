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


class Preempted(DmtpError):
    """SIGTERM arrived (spot reclaim, Kubernetes eviction, a cancelled flow run): the work done so
    far is saved (a checkpoint, a committed batch) and a rerun with --resume goes on from there."""

    # EX_TEMPFAIL from sysexits.h: distinct from a bad input (2) and from a crash, so a task can
    # tell "retry me" from "fix me".
    exit_code = 75


class DiskFull(DmtpError):
    """A write failed for lack of space (ENOSPC/EDQUOT). Nothing half-written is marked complete;
    free space and rerun with --resume."""
