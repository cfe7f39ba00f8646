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
