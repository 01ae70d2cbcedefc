"""samvit's error types, and the one check that a path is a regular file before it is opened.

Every error a user's input can cause is a SamvitError: the CLI prints it as one line (exit code 2, or 1 for an
item of a batch that goes on) and a caller can catch them all at once. A leaf: it imports nothing of samvit.
"""
from __future__ import annotations

import os
import stat
from typing import BinaryIO, Union

PathLike = Union[str, os.PathLike]


class SamvitError(Exception):
    """Base of the errors caused by bad input: a file, an argument, or metadata read from a file.

    `exit_code` is the CLI's exit code for it (2: nothing, or nothing more, was done)."""

    exit_code = 2


class ParameterError(SamvitError, ValueError):
    """A library function's argument out of its domain. `param` names the parameter (the CLI names the flag that
    set it: see samvit.cli.describe_error)."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


class InputError(SamvitError, ValueError):
    """An input path that cannot be used: not a regular file, a list file that cannot be read, colliding names."""


class OutputError(SamvitError, ValueError):
    """A write that samvit refuses: over one of its inputs, outside its output folder, or over an existing output
    without force."""


class MetadataError(SamvitError, ValueError):
    """Metadata read from a file (a header, a config, an index line) that is missing a field or out of bounds."""


class ProvenanceError(SamvitError, ValueError):
    """An embedding used with a model other than the one that made it (model, checkpoint or image size)."""


class NonFiniteError(SamvitError, ValueError):
    """An embedding, or a model output, with NaN or infinite values."""


class TrainingDivergedError(NonFiniteError):
    """A training run whose loss (or weights) became NaN or infinite: the run stops at that step (exit code 1,
    the checkpoints before it are kept)."""

    exit_code = 1


class RunLockedError(SamvitError):
    """A training run folder that another process is training in (its lock file names the holder)."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    """What a st_mode describes, in words ('a regular file', 'a FIFO (named pipe)', ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def require_regular_file(path: PathLike, what: str = "input", error: type = InputError) -> int:
    """Raise `error` naming `path` unless it is, after resolving symlinks, an existing regular file; returns its
    size. Never opens the path, so a FIFO or a device cannot block."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file ({what})") from None
    except OSError as e:
        raise error(f"{path}: cannot access {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        link = " (through a symlink)" if os.path.islink(path) else ""
        raise error(f"{path}: is {file_kind(st.st_mode)}{link}; expected a regular file ({what})")
    return st.st_size


def open_regular(path: PathLike, what: str = "input", error: type = InputError) -> BinaryIO:
    """Open a regular file for reading in binary, or raise `error` naming it. The open itself cannot block (it is
    non-blocking, and the file is checked with fstat before a byte is read), so a path swapped for a FIFO between
    a check and the open is refused too."""
    path = os.fspath(path)
    require_regular_file(path, what, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{path}: cannot open {what} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: is {file_kind(st.st_mode)}; expected a regular file ({what})")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
