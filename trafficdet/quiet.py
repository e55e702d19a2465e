"""A quiet terminal: the libraries' routine log lines dropped, their errors kept.

TF 2.15 logs cuDNN/cuFFT/cuBLAS "Unable to register ... factory" at ERROR level on every
import (a known duplicate-registration bug, tensorflow#62075, harmless), so only C++ level 3
(FATAL) hides them; real failures still reach Python as exceptions. Its Python deps emit
deprecation warnings nobody here can act on, and Keras warns "Gradients do not exist" for
Model Maker's unused head variables every step.

MediaPipe 0.10.21 and TFLite log from C++ straight to file descriptor 2, at INFO and
WARNING, on every healthy run: "GPU suport is not available ... Unable to initialize EGL"
(no GPU), "Created TensorFlow Lite XNNPACK delegate for CPU", "Feedback manager requires a
model with a single signature", absl's "All log messages before absl::InitializeLog()"
banner, and the TFLite converter's ~25-line "Summary on the non-converted ops" (its
``arith.constant`` count: constants, not a failed conversion). None of them has a switch:
MediaPipe logs through absl, which reads no environment variable (GLOG_minloglevel and
ABSL_MIN_LOG_LEVEL were tried: no effect), TFLite's minimal logger has no setting Python can
reach, and the converter prints its summary whatever TF_CPP_MIN_LOG_LEVEL says.

So ``filter_native_logs`` routes descriptor 2 through a small filter process (this file run
as a script) that drops exactly those forms and passes everything else: ERROR and FATAL
lines, crash reports, anything unknown. A separate process rather than a thread, so that
what a crashing process writes last still reaches the terminal. Python's own ``sys.stderr``
(tracebacks, ``error:`` lines, progress bars) is pointed at the real terminal directly and
never goes through the filter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator

# Whole lines (without the newline) that a healthy run prints and nobody can act on.
NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+\s+\d+ [\w./-]+\.(cc|h|cpp):\d+\] .*"  # absl/glog INFO and WARNING from C++
    rb"|INFO: .*"  # TFLite's minimal logger at INFO (its ERROR lines start "ERROR: ")
    # libjpeg's own line when TensorFlow's decoder gives up on a damaged file; TensorFlow then
    # raises an error, which the caller reports with the file's name
    rb"|Improper call to JPEG library in state \d+"
)
SUMMARY_START = b"Summary on the non-converted ops:"
# The lines of that summary: rule, "* ..." totals, "- op: N occurrences (types)", "(f32: 34)" per location, blanks.
SUMMARY_LINE = re.compile(rb"-+|\s*|\s*\* .*|- [\w.]+:\s+\d+ occurrences.*|\s*\((\w+: \d+(, )?)+\)")

_installed = False


def filtered(lines: Iterable[bytes]) -> Iterator[bytes]:
    """``lines`` without the known noise (the converter's summary as a whole block)."""
    in_summary = False
    for line in lines:
        text = line.rstrip(b"\r\n")
        if in_summary and SUMMARY_LINE.fullmatch(text):
            continue
        in_summary = text == SUMMARY_START
        if not in_summary and not NOISE.fullmatch(text):
            yield line


def quiet_libraries() -> None:
    """All of the above, for the rest of this process; call before importing TensorFlow or MediaPipe."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    filter_native_logs()


def filter_native_logs() -> None:
    """Send what native code writes to descriptor 2 through the filter, for the rest of this process."""
    global _installed
    if _installed:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    read, write = os.pipe()
    # Its own session: Ctrl-C stops the stage, not the filter, which ends when the last writer closes the pipe.
    subprocess.Popen([sys.executable, "-I", "-S", __file__], stdin=read, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    encoding, errors = sys.stderr.encoding or "utf-8", sys.stderr.errors or "backslashreplace"
    sys.stderr = io.TextIOWrapper(
        io.FileIO(terminal, "w", closefd=False), encoding=encoding, errors=errors, line_buffering=True, write_through=True
    )
    _installed = True


def main() -> None:
    """The filter process: stdin to stdout, line by line, without the noise."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout.buffer
    for line in filtered(iter(sys.stdin.buffer.readline, b"")):
        out.write(line)
        out.flush()


if __name__ == "__main__":
    main()
