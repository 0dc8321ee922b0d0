"""The one exception type users see: a problem with their input, told in one line."""


class ScionError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    The message names the file or value at fault and the fix; no traceback is shown
    unless `--debug` is given.
    """

    exit_code = 2
