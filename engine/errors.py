"""Errors a user can act on. The CLI prints their message on one line, with no traceback, and exits non-zero."""


class UserError(Exception):
    """A mistake in what the user asked for or gave us (missing file, bad preset, unreadable volume)."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped before writing a corrupt checkpoint."""
