"""The one exception type users see: a problem with their input, told in one line."""


# Exit statuses: 0 done; 2 bad input (ScionError); 3 training diverged (scion.train.guards);
# 75 stopped early by a signal or time limit, with a checkpoint saved to resume from (EX_TEMPFAIL).
STOPPED_EARLY = 75


class ScionError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero.

    The message names the file or value at fault and the fix; no traceback is shown
    unless `--debug` is given.
    """

    exit_code = 2
