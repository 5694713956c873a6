"""modelpress command line: parses arguments, renders reports, maps errors to exit codes."""

import sys


def _interrupted_quietly(kind, value, traceback):  # type: ignore[no-untyped-def]
    """Ctrl-C while the command is still starting (importing its modules) ends it the way
    Ctrl-C does once it runs, with "Aborted!", not a KeyboardInterrupt traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("Aborted!\n")
        return
    _previous_hook(kind, value, traceback)


# Set on import of the command line only (the library never prints); the console script
# and `python -m modelpress` import this package before anything slow.
_previous_hook = sys.excepthook
sys.excepthook = _interrupted_quietly
