"""The error type of user mistakes, kept apart from bugs.

:class:`ConfigError` is raised for anything the user can fix (an option, a path, a dataset that does not
fit the config): the message says what is wrong, the value seen and the fix. ``launch/run.py`` prints it
as one line naming the rank, once per job when every rank hits the same error (``tide_ds.failfast.report``,
exit code 2); any other exception is a bug and keeps its traceback (exit code 1).
It subclasses ``ValueError`` so that callers catching ``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user error: a bad option value, path or input; the message names it and the fix."""
