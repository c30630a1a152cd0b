"""Errors a user can act on.

:class:`UserError` and its subclasses are problems with what the user gave or asked for — a
file, a store, an option value, a missing extra, a cluster that does not start. The command
line prints them as one line naming the file and the problem (exit status 2). Anything else
that escapes is a stemdask bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input, the request or the environment, stated so a user can fix it."""


class InvalidParameter(UserError, ValueError):
    """A parameter value that the method or function cannot use (out of range, wrong kind)."""


class MissingExtra(UserError, ImportError):
    """An optional dependency (a ``pip install "stemdask[EXTRA]"`` extra) is not installed."""
