"""One error type for everything a user can fix, printed as a single clear line."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

# What to do about the operating-system errors a user can fix, by errno.
OS_ADVICE = {
    errno.ENOSPC: "free space on that disk (df -h) or move the repository to a larger one, then rerun",
    errno.EDQUOT: "free space within your disk quota, then rerun",
    errno.EACCES: "give your user write access to it (ls -l, chmod/chown), then rerun",
    errno.EPERM: "give your user write access to it (ls -l, chmod/chown), then rerun",
    errno.EROFS: "the file system is read-only: run from a writable copy of the repository",
    errno.EMFILE: "raise the open-file limit (ulimit -n), then rerun",
}


class PipelineError(Exception):
    """A problem with inputs, params, the network or the disk that the user can act on.

    Stages raise it with a message naming the file, URL or param and what is wrong;
    ``run_stage`` prints it as one line (no traceback) and exits non-zero.
    """


def os_error_line(err: BaseException) -> str | None:
    """One line for an OS error the user can fix (disk full, permissions, read-only), else None.

    ``OSError`` carries errno and the path; TensorFlow and h5py raise their own types with
    only the text of the cause (e.g. "No space left on device"), so that is matched too.
    """
    if isinstance(err, OSError) and err.errno in OS_ADVICE:
        code = err.errno
        return f"{err.filename or 'an output file'}: {err.strerror or os.strerror(code)}: {OS_ADVICE[code]}"
    code = next((c for c in OS_ADVICE if os.strerror(c) in str(err)), None)
    if code is None:
        return None
    first = str(err).strip().splitlines()[0]
    return f"{first[:300]}: {OS_ADVICE[code]}"


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` and turn a user-fixable error into one line on stderr.

    Besides ``PipelineError``: operating-system errors with a known remedy (``os_error_line``).
    """
    try:
        main()
    except PipelineError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        line = os_error_line(err)
        if line is None:
            raise  # a bug: the traceback is what a developer needs
        _fail(line)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)
