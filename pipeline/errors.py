"""The errors a user can act on.

``interneg`` prints an InterNegError as one ``error:`` line (exit status 2); anything else
is a bug and keeps its traceback. So raise one of these only when the message alone tells
the user what to fix: it names the input or setting and the problem.

This module imports nothing, so the CLI can catch these without loading torch.
"""


class InterNegError(Exception):
    """A failure the user can fix; the message names the input or setting and the problem."""


class ConfigError(InterNegError):
    """A setting, option or environment that cannot work as given."""


class InputError(InterNegError):
    """A file, folder, image or class list given to the project that is unusable."""
