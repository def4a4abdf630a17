"""Sending a process's output (its own prints, library chatter, C++ extensions writing to fd 1/2) to a log file.

The command line keeps the console for people: one line per stage, progress, the summary, errors. Everything else
the driver and each training worker print lands in ``<run_dir>/logs/`` instead (``--verbose`` shows it live).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Where notices go while library output is captured (set by captured_output); None: plain stdout.
_notice_stream: TextIO | None = None


def notice(message: str) -> None:
    """A line meant for the person running the job (a skipped partition, a lease being waited for, checkpoints moved
    aside): on the console even while library output goes to the log file, and in the log too."""
    print(message, flush=True)
    if _notice_stream is not None:
        _notice_stream.write(message + "\n")
        _notice_stream.flush()


def _file_handler(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler


def _redirect(fh: TextIO, handler: logging.Handler) -> None:
    """fds 1 and 2, ``sys.stdout``/``sys.stderr``, Python warnings and the root logger all write to ``fh``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    logging.captureWarnings(True)
    logging.getLogger().addHandler(handler)


def redirect_process_output(path: Path) -> None:
    """For the rest of this process: everything it writes goes to ``path`` (appending). For processes that exist to
    do one job, such as a training worker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _redirect(open(path, "a", buffering=1), _file_handler(path))  # noqa: SIM115 (lives as long as the process)


def _console_stream(stream: TextIO) -> TextIO:
    """A stream that keeps reaching the terminal after fds 1/2 are redirected (a test runner's buffer stays as is)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    if fd not in (1, 2):
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8")


@contextlib.contextmanager
def captured_output(path: Path, console: TextIO) -> Iterator[TextIO]:
    """While inside: the process's output goes to ``path``; yields the stream to print the console lines to.

    Restores fds 1/2, ``sys.stdout``/``sys.stderr`` and logging on exit, also on errors, so an error is printed in full
    on the real terminal by whoever catches it. Child processes started inside (Ray's) keep writing to ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    out = _console_stream(console)
    saved_fds = (os.dup(1), os.dup(2))
    saved_streams = (sys.stdout, sys.stderr)
    root = logging.getLogger()
    saved_level = root.level
    handler = _file_handler(path)
    fh = open(path, "a", buffering=1)  # noqa: SIM115 (closed in finally)
    try:
        _redirect(fh, handler)
        root.setLevel(min(saved_level or logging.WARNING, logging.INFO))
        global _notice_stream
        _notice_stream = out
        yield out
    finally:
        _notice_stream = None
        fh.flush()
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        sys.stdout, sys.stderr = saved_streams
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(saved_level)
        handler.close()
        fh.close()
        if out is not console:
            out.close()
