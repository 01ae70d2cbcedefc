"""The one `samvit` command; each sub-command lives in its own module, imported only when it runs."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module under samvit.cli, one-line help). Each module has add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "embed": ("embed", "embed images into SAM image embeddings (one .safetensors per image, or --store PATH)"),
    "store": ("store", "info, ls or verify an embedding store written by `samvit embed --store`"),
    "info": ("info", "print a preset's or a checkpoint's architecture and parameter count"),
    "bench": ("bench", "time the encoder side by side with segment-anything, timm and transformers"),
    "download": ("download", "fetch the official SAM checkpoints into the verified cache (resumable)"),
    "convert": ("convert", "convert a checkpoint between the official, transformers, timm and samvit layouts"),
    "segment": ("segment", "masks from point / box prompts, or automatic masks for the whole image"),
    "export": ("export", "export the image encoder to ONNX (external data for vit_h), --verify in onnxruntime"),
}


class UserError(Exception):
    """An error caused by the user's input: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(prog="samvit", description="The Segment Anything ViT image encoder: "
                                     "embeddings, masks, weights and benchmarks.")
    parser.add_argument("--version", action="version", version=f"samvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f"samvit.cli.{module}").add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `samvit` command."""
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and --version end here, before torch is imported
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from ..checkpoints.files import CheckpointError
    from ..data.images import ImageError
    from ..runtime import tune_allocator

    tune_allocator()
    try:
        return importlib.import_module(f"samvit.cli.{args._module}").run(args)
    except (UserError, CheckpointError, ImageError, ValueError, FileNotFoundError) as e:
        print(f"samvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
