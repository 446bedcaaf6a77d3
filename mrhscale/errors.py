"""The one exception type a user can cause.

The CLI prints it on one line and exits with status 2; library callers can
catch it to tell their own mistakes from bugs.
"""


class MRHError(Exception):
    """A problem with the user's input, options or environment (not a bug)."""
