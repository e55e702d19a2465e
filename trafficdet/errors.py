"""One error type for everything a user can fix, printed as a single clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem with inputs, params or the network that the user can act on.

    Stages raise it with a message naming the file, URL or param and what is wrong;
    ``run_stage`` prints it as one line (no traceback) and exits non-zero.
    """


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` and turn a ``PipelineError`` into one line on stderr."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
