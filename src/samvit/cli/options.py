"""The options several sub-commands share, each defined once: which weights (--checkpoint, --model), where and how
they run (--device, --dtype, --img-size), and how much is printed (--quiet)."""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Optional

from ..config import NO_RELEASED_WEIGHTS, PRESET_ALIASES, PRESETS, TINYVIT_PRESETS


def _listed(names: Iterable[str]) -> str:
    """Preset names for a help text, each followed by its aliases: "tinyvit_5m (alias vit_tiny)"."""
    aliases = {n: [a for a, target in PRESET_ALIASES.items() if target == n] for n in names}
    return ", ".join(n + (f" (alias {', '.join(aliases[n])})" if aliases[n] else "") for n in names)


# The preset lists of the help texts, from samvit.config (the released ones are the registry's names).
RELEASED = [n for n in PRESETS if n not in NO_RELEASED_WEIGHTS]
VIT_PRESETS = _listed(PRESETS)
ENCODER_PRESETS = _listed([*PRESETS, *TINYVIT_PRESETS])
SAM_PRESETS = _listed([*RELEASED, *TINYVIT_PRESETS])
REGISTRY = f"a registry name ({', '.join(RELEASED)}: fetched into the verified cache)"
ENCODER_FILE = "checkpoint file (official, transformers or timm layout; .pth/.bin/.safetensors)"
SAM_FILE = "full SAM checkpoint (official .pth, transformers SamModel file or folder, .safetensors)"
DTYPES = ["float32", "bfloat16", "float16"]
AUTO_DTYPE = ("auto: bfloat16 where the device computes it natively, i.e. CUDA with bf16 or a CPU with "
              "AVX512-BF16/AMX, else float32")


def add_checkpoint(p: argparse.ArgumentParser, what: str = ENCODER_FILE, required: bool = False,
                   note: str = "") -> None:
    """--checkpoint: `what` (a file) or a registry name; $SAMVIT_CHECKPOINT by default unless `required`."""
    if required:
        p.add_argument("--checkpoint", required=True, metavar="CK", help=f"{what} or {REGISTRY}{note}")
    else:
        p.add_argument("--checkpoint", default=os.environ.get("SAMVIT_CHECKPOINT"),
                       help=f"{what} or {REGISTRY}{note}; default: $SAMVIT_CHECKPOINT")


def add_model(p: argparse.ArgumentParser, presets: Optional[str] = ENCODER_PRESETS) -> None:
    """--model: one of `presets`; presets=None: a preset or a JSON file of EncoderConfig fields (read it with
    encoder_spec). Inferred from the checkpoint when omitted."""
    if presets is None:
        p.add_argument("--model", default=None, metavar="PRESET|CONFIG.json", help="the encoder preset, or a JSON "
                       "file of EncoderConfig fields (default: from the checkpoint)")
    else:
        p.add_argument("--model", default=None, help=f"preset ({presets}); inferred from the checkpoint when omitted")


def encoder_spec(model: Optional[str], flag: str = "--model"):
    """The value of add_model(presets=None): None, a preset name, or the EncoderConfig of a JSON file."""
    if model is None or not model.endswith(".json"):
        return model
    import json

    from ..config import EncoderConfig
    from . import UserError

    try:
        with open(model, encoding="utf-8") as fh:
            return EncoderConfig.from_dict(json.load(fh))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserError(f"{flag} {model}: cannot read an EncoderConfig from it ({e})") from None


def add_device(p: argparse.ArgumentParser, default: Optional[str] = None, torchrun: bool = False) -> None:
    """--device: cpu, cuda, cuda:N; cuda when available by default (under torchrun each process's cuda:LOCAL_RANK)."""
    if default is not None:
        when = default
    else:
        when = "cuda if available" + ("; cuda:LOCAL_RANK under torchrun" if torchrun else "")
    p.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N (default: {when})")


def add_dtype(p: argparse.ArgumentParser, auto: bool = True, decoder: bool = False) -> None:
    """--dtype of the image encoder: float32 (the default, runtime.DEFAULT_DTYPE), bfloat16, float16, and with
    `auto` also auto; `decoder`: the command also runs the prompt decoder, in float32. The value None means the
    default (print it with runtime.describe_dtype)."""
    what, tail = ("image encoder compute dtype", "; the decoder runs in float32") if decoder else ("compute dtype", "")
    choices = (["auto"] if auto else []) + DTYPES
    p.add_argument("--dtype", default=None, choices=choices,
                   help=f"{what} (default float32: the official package's, the same numbers on every machine"
                   + (f"; {AUTO_DTYPE}" if auto else "") + f"){tail}")


def add_img_size(p: argparse.ArgumentParser, default: str = "the checkpoint's, 1024") -> None:
    """--img-size PIXELS: the model's input side (check it with check_img_size)."""
    p.add_argument("--img-size", type=int, default=None, metavar="PIXELS",
                   help="input side (e.g. 512, 768, 1024, 1280; a multiple of 16): images are resized to it and the "
                   f"position tables follow (default: {default})")


def check_img_size(img_size: Optional[int]) -> None:
    """Refuse an --img-size that is not a positive multiple of 16 (the patch size)."""
    from . import UserError

    if img_size is not None and (img_size < 16 or img_size % 16):
        raise UserError(f"--img-size must be a positive multiple of 16, got {img_size}")


def add_cache(p: argparse.ArgumentParser) -> None:
    """--cache-dir and --base-url of the registry's verified download cache."""
    p.add_argument("--cache-dir", default=None, help="cache folder of the registry's checkpoints (default: "
                   "$SAMVIT_CACHE or ~/.cache/samvit)")
    p.add_argument("--base-url", default=None, help="mirror to fetch the registry's checkpoints from instead "
                   "(default: $SAMVIT_BASE_URL or the public SAM release host); the file name is appended")


def add_quiet(p: argparse.ArgumentParser, what: str = "no progress bar, no summary") -> None:
    """--quiet: print less (`what`)."""
    p.add_argument("--quiet", action="store_true", help=what)
