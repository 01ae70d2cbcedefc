"""The one `samvit` command; each sub-command lives in its own module, imported only when it runs.

main() is the one error boundary of every sub-command: an error a user can cause ends as one line
`samvit COMMAND: error: ...` and an exit code, never a traceback (--debug or SAMVIT_DEBUG=1 shows it).
Exit codes: 0 ok; 1 the run finished but some items failed (each listed); 2 usage error or unusable input or
output (nothing, or nothing more, was done); 3 an internal error (a bug: please report it with --debug);
130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from ..errors import SamvitError

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The sub-commands, in the order --help lists them: each is the module samvit.cli.NAME, with HELP (its one-line
# help), add_arguments(parser) and run(args) -> int.
COMMANDS = ("embed", "store", "info", "bench", "download", "convert", "segment", "export", "serve", "inspect", "train",
            "evaluate")


class UserError(SamvitError):
    """An error caused by the user's input: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="samvit", description="The Segment Anything ViT image encoder: "
                                     "embeddings, masks, weights and benchmarks.")
    parser.add_argument("--version", action="version", version=f"samvit {__version__}")
    debug_help = "show the full traceback of an error (for bug reports); also SAMVIT_DEBUG=1"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"samvit.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        module.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `samvit` command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and --version end here, before torch is imported
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    debug = args.debug or os.environ.get("SAMVIT_DEBUG", "") not in ("", "0")
    try:
        from ..runtime import tune_allocator

        tune_allocator()
        return importlib.import_module(f"samvit.cli.{args.command}").run(args)
    except KeyboardInterrupt:
        print(f"samvit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message, code = describe_error(e)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"samvit {args.command}: error: {message}", file=sys.stderr)
        if code == EXIT_INTERNAL and not debug:
            print(f"samvit {args.command}: this is a bug in samvit; run again with --debug and report the "
                  "traceback", file=sys.stderr)
        return code


def describe_error(e: BaseException) -> "tuple[str, int]":
    """(one-line message, exit code) of an exception that reached the command's boundary, by its kind: samvit's
    typed errors (bad input), OS errors (a file, a full disk) and object-storage errors (an endpoint, credentials)
    are the user's or the machine's (exit 2, or the error's own exit_code); an unexpected ValueError or
    RuntimeError (a bug, or one raised inside torch) is samvit's (exit 3)."""
    text = worker_message(e)
    if isinstance(e, SamvitError):
        return flag_names(text, getattr(e, "param", "")), getattr(e, "exit_code", EXIT_USAGE)
    if isinstance(e, ImportError) and not (e.name or "").startswith("samvit"):
        return missing_dependency(e), EXIT_USAGE
    if isinstance(e, OSError):  # file exists, read-only, disk full, is a directory, permission denied...
        where = " -> ".join(os.fspath(f) for f in (e.filename, e.filename2) if f is not None)
        what = e.strerror or text or type(e).__name__
        return (f"{where}: {what}" if where else what), EXIT_USAGE
    if any(c.__module__.split(".")[0] in ("botocore", "aiobotocore") for c in type(e).__mro__):
        # S3 through s3fs: an endpoint that does not answer, missing or refused credentials, a bucket denied
        return f"object storage: {type(e).__name__}: {text}", EXIT_USAGE
    if type(e).__name__ == "SafetensorError":  # safetensors' own type, without importing it here
        return f"safetensors: {text}", EXIT_USAGE
    if isinstance(e, MemoryError):
        return f"out of memory ({text or 'MemoryError'})", EXIT_USAGE
    if isinstance(e, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):
        # torch.save's own report of a failed write (a full disk) where samvit did not turn it into an OSError
        return f"torch.save could not write its file (a full disk?): {text.splitlines()[-1]}", EXIT_USAGE
    if type(e).__name__ == "JSONDecodeError":  # a file given as JSON that is not (json's own ValueError)
        return f"not valid JSON ({text})", EXIT_USAGE
    if isinstance(e, UnicodeDecodeError):  # a file given as text that is not UTF-8
        return f"not UTF-8 text ({text})", EXIT_USAGE
    if isinstance(e, ValueError) and (_raised_by_samvit(e) if text == str(e) else _worker_raised_by_samvit(str(e))):
        # an argument check written as `raise ValueError(...)` in samvit's own code, not yet a typed error
        return text or type(e).__name__, EXIT_USAGE
    return f"{type(e).__name__}: {text}", EXIT_INTERNAL


# Library parameters named in messages as `name=value` that are the CLI flag --name-with-dashes (value: its value;
# True: the flag alone).
CLI_PARAMS = ("allow_mixed_dtypes", "allow_mismatch", "dtype", "force", "batch_size", "img_size", "device")


def flag_names(message: str, param: str = "") -> str:
    """A library message in the CLI's words: its parameter `param` (a ParameterError's) named as the flag
    (batch_size -> --batch-size), and `name=True` / `name=value` advice for CLI_PARAMS as `--name` / `--name value`."""
    import re

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if param and not param.startswith("-"):
        message = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w=-])", flag(param), message)
    names = "|".join(CLI_PARAMS)
    message = re.sub(rf"(?<![\w-])({names})=True\b", lambda m: flag(m.group(1)), message)
    return re.sub(rf"(?<![\w-])({names})=([\w.:]+)", lambda m: f"{flag(m.group(1))} {m.group(2)}", message)


def worker_message(e: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker (whose message holds the worker's whole
    traceback) the original message alone, as the same error gives without workers."""
    text = str(e)
    if " in DataLoader worker process " not in text or "Traceback (most recent call last)" not in text:
        return text
    import re

    lines = text.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
    tail = "\n".join(lines[last_frame + 1:]).strip()
    return re.sub(r"^[\w.]+: ", "", tail, count=1) or text


def _worker_raised_by_samvit(wrapped: str) -> bool:
    """_raised_by_samvit for an error re-raised from a DataLoader worker: read from the worker's traceback text."""
    lines = wrapped.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    if not frames or frames[-1] + 1 >= len(lines):
        return False
    where, code = lines[frames[-1]], lines[frames[-1] + 1].strip()
    return f"{os.sep}samvit{os.sep}" in where and code.startswith("raise ")


def _raised_by_samvit(e: BaseException) -> bool:
    """Whether `e` was raised by a `raise` statement in samvit's own code (not inside torch or numpy, nor an
    implicit one such as a failed unpacking)."""
    import linecache

    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if not (frame.f_globals.get("__name__") or "").startswith("samvit."):
        return False
    return linecache.getline(frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise ")


_DISTRIBUTIONS = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "PIL": "pillow", "yaml": "pyyaml",
                  "sklearn": "scikit-learn"}


def missing_dependency(e: ImportError) -> str:
    """'needs the optional package X: pip install samvit[extra]' for a package one of samvit's extras holds."""
    import re

    if not e.name:  # raised by samvit itself with its own advice
        return str(e) if "pip install" in str(e) else f"{e}: a needed package is missing (see pip install samvit[...])"
    module = e.name.split(".")[0]
    dist = _DISTRIBUTIONS.get(module, module)
    extras = []
    try:
        from importlib.metadata import requires

        for req in requires("samvit") or []:
            m = re.match(r"\s*([A-Za-z0-9_.\-]+).*extra\s*==\s*[\"']([^\"']+)[\"']", req)
            if m and m.group(1).lower().replace("_", "-") == dist.lower().replace("_", "-") and m.group(2) != "test":
                extras.append(m.group(2))
    except Exception:  # no installed metadata: name the package alone
        pass
    how = f"pip install 'samvit[{extras[0]}]'" if extras else f"pip install {dist}"
    return f"this needs the optional package {dist!r}, which is not installed ({e}): {how}"


if __name__ == "__main__":
    sys.exit(main())
