"""The one exception type a stage raises for a problem the user must fix (bad input, bad params).

The CLI prints its message as one line and exits 1, without a traceback: the message names the file,
the line where there is one, and the fix.
"""


class StageError(RuntimeError):
    pass
