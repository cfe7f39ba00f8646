"""User-facing errors.

Anything the user can fix (a missing path, a bad scheme, an unsupported model, empty calibration data)
raises `TlqError`; the CLI prints its one-line message and exits with status 2 instead of a traceback.
"""


class TlqError(Exception):
    """A problem with the user's input, stated in one line that names the fix."""


class RankFailure(TlqError):
    """A collective failed because another calibration rank died or stopped answering.

    The process group is then unusable, and tearing it down can abort the process (gloo's C++ destructors
    call std::terminate on a broken connection), so the CLI leaves with os._exit after printing the line.
    """


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The reason a library gave, as one line: validation errors put it on a later line
    ("Class validation error ...:\n    ValueError: ..."), so prefer a line that names an error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = next((line for line in lines[1:] if "Error:" in line), lines[0])
    return reason[:limit]
