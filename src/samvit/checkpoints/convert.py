"""Checkpoint conversion, file to file: any supported layout in, samvit safetensors / official / transformers /
timm out. Only names change: every tensor is written as it was read."""
from __future__ import annotations

import os
import warnings

from ..errors import OutputError, ParameterError
from .files import CONFIG_METADATA_KEY, PathLike, read_checkpoint, save_checkpoint, write_tensors
from .keymaps import FORMATS, detect_format, from_official, to_official
from .load import ModelSpec, _encoder_part, check_state_dict, encoder_config, infer_config
from .registry import resolve_checkpoint

OUTPUTS = ("safetensors",) + FORMATS


def convert_checkpoint(src: PathLike, dst: PathLike, to: str = "safetensors", model: ModelSpec = None,
                       progress=None, force: bool = False) -> str:
    """Write the checkpoint `src` to `dst` in layout `to`.

    Args:
        src: any checkpoint argument load_encoder takes (file of any supported layout, transformers folder,
            registry name).
        dst: a safetensors file if it ends in .safetensors, else a torch.save dict of tensors.
        to: 'safetensors' (samvit's own file: encoder weights plus config metadata, what save_encoder writes),
            'official', 'transformers' or 'timm'.
        model: a preset name or EncoderConfig, needed only when no preset fits and the file carries no config.
        force: replace an existing dst (OutputError otherwise). dst is never the input file.
    A model that no preset describes keeps its config in every output (safetensors metadata, or a
    {"state_dict", "samvit_config"} dict for torch.save files), so the result loads again without --model.
    Returns:
        the detected input layout.
    """
    if to not in OUTPUTS:
        raise ParameterError(f"--to {to!r}: expected one of {', '.join(OUTPUTS)}")
    src = resolve_checkpoint(src, progress=progress)
    dst = os.fspath(dst)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise OutputError(f"{dst}: output is the input file; choose another output path")
    if os.path.isdir(dst):
        raise OutputError(f"{dst}: is a folder; expected the output file's name")
    if os.path.lexists(dst) and not force:
        raise OutputError(f"{dst}: exists; pass --force to replace it, or choose another output path")
    sd, metadata = read_checkpoint(src)
    fmt = detect_format(sd)
    official = to_official(sd, fmt)
    enc = _encoder_part(official)
    cfg = encoder_config(model, metadata, enc, src)
    check_state_dict(enc, cfg, source=src)
    if to == "safetensors":
        if not dst.endswith(".safetensors"):
            raise ParameterError(f"{dst}: --to safetensors writes a .safetensors file; give the output that suffix")
        if len(enc) < len(official):
            warnings.warn("samvit's safetensors file holds the image encoder only: the prompt encoder and mask "
                          "decoder tensors are not written (use --to official to keep them)")
        write_tensors(dst, enc, {CONFIG_METADATA_KEY: cfg.to_json(), "format": "samvit"})
    else:
        try:
            keep = infer_config(enc) != cfg  # a preset's shapes give back its config: the file stays plain
        except ValueError:
            keep = True
        save_checkpoint(dst, from_official(official, to), cfg.to_json() if keep else None)
    return fmt
