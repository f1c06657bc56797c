"""The one root of every error whose message is written for the user.

The CLI and the demo catch ``DilsegError`` and show its message in one line; anything else
is a bug and keeps its traceback. Each stage raises its own subclass so callers can tell
them apart without matching class names.
"""

from __future__ import annotations


class DilsegError(Exception):
    """An error written for the user: the message says what was wrong and what to do."""
