"""The one exception type for user mistakes, and how its messages stay one readable line.

The CLI turns an `ErdeError` into its message (`one_line`) and exit status 2; any other
exception is a bug and keeps its traceback.
"""

import re


class ErdeError(Exception):
    """A user mistake: the message names the problem and the fix."""


def excerpt(text: object, limit: int = 160) -> str:
    """`text` on one line, its middle cut when it is longer than `limit`: a message quoting a
    20 KB value or a deeply nested one stays one readable line that still ends with its fix."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    keep = max((limit - 40) // 2, 10)
    return f"{text[:keep]} ... [{len(text):,} characters in all] ... {text[-keep:]}"


_LONG_WORD = re.compile(r"\S{401,}")


def one_line(message: object) -> str:
    """A message as the CLI prints it: one line, every run of more than 400 characters without
    a space (a value pasted whole, 20 KB of one word) cut in its middle."""
    return _LONG_WORD.sub(lambda m: excerpt(m.group(), 200), " ".join(str(message).split()))
