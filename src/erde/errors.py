"""The one exception type for user mistakes.

The CLI turns an `ErdeError` into its message and exit status 2; any other exception is a bug
and keeps its traceback.
"""


class ErdeError(Exception):
    """A user mistake: the message names the problem and the fix."""
