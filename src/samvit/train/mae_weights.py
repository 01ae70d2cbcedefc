"""MAE checkpoints in: the official facebookresearch/mae files and transformers' ViTMAEForPreTraining weights.

Key names (N: block index; every Linear and LayerNorm has .weight and .bias; T = vit.encoder.layer.N in
transformers' files, vit.layers.N in transformers >= 5 in memory):

| samvit MaskedAutoencoder  | official models_mae (.pth "model") | transformers ViTMAEForPreTraining             |
|---------------------------|------------------------------------|-----------------------------------------------|
| cls_token                 | cls_token                          | vit.embeddings.cls_token                      |
| pos_embed (1, 1+L, D)     | pos_embed                          | vit.embeddings.position_embeddings            |
| patch_embed.proj          | patch_embed.proj                   | vit.embeddings.patch_embeddings.projection    |
| blocks.N.norm1            | blocks.N.norm1                     | T.layernorm_before                            |
| blocks.N.attn.qkv (3D, D) | blocks.N.attn.qkv                  | T.attention.attention.{query,key,value}       |
|                           |                                    |   (or T.attention.{q,k,v}_proj), stacked      |
| blocks.N.attn.proj        | blocks.N.attn.proj                 | T.attention.output.dense (T.attention.o_proj) |
| blocks.N.norm2            | blocks.N.norm2                     | T.layernorm_after                             |
| blocks.N.mlp.lin1         | blocks.N.mlp.fc1                   | T.intermediate.dense (T.mlp.fc1)              |
| blocks.N.mlp.lin2         | blocks.N.mlp.fc2                   | T.output.dense (T.mlp.fc2)                    |
| norm                      | norm                               | vit.layernorm                                 |
| decoder_embed             | decoder_embed                      | decoder.decoder_embed                         |
| mask_token                | mask_token                         | decoder.mask_token                            |
| decoder_pos_embed         | decoder_pos_embed                  | decoder.decoder_pos_embed                     |
| decoder_blocks.N.*        | decoder_blocks.N.* (as blocks)     | decoder.decoder_layers.N.* (as T; written     |
|                           |                                    |   decoder.decoder_encoder.layer.N.* by 5.x)   |
| decoder_norm              | decoder_norm                       | decoder.decoder_norm                          |
| decoder_pred              | decoder_pred                       | decoder.decoder_pred                          |

transformers' ViTMAEModel (the encoder alone) has the vit.* keys without the "vit." prefix.

The released pre-training checkpoints (mae_pretrain_vit_base/large/huge.pth) hold the encoder only: they load
with the decoder left at its MAE init, and the report says so. Anything else missing, any unexpected key or shape
is a CheckpointError. The official ViT-H is patch 14 (its config is read from the tensors).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..config import MAE_PRESETS, MAEConfig, mae_preset
from ..modeling.mae import MaskedAutoencoder
from ..checkpoints.files import CheckpointError, check_keys, read_checkpoint
from ..errors import ParameterError

StateDict = Dict[str, torch.Tensor]
MAE_FORMATS = ("samvit", "official", "transformers")
_DECODER_KEYS = re.compile(r"^(decoder_|mask_token$)")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers

_HF_TOP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
}
_HF_LAYER = re.compile(r"^(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)"
                       r"\.(\d+)\.(.+)\.(weight|bias)$")
_HF_LAYER_PARTS = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.lin1", "intermediate.dense": "mlp.lin1",
    "mlp.fc2": "mlp.lin2", "output.dense": "mlp.lin2",
    "attention.q_proj": "q", "attention.attention.query": "q",
    "attention.k_proj": "k", "attention.attention.key": "k",
    "attention.v_proj": "v", "attention.attention.value": "v",
}


def _strip_wrappers(sd: StateDict) -> StateDict:
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_mae_format(sd: StateDict) -> str:
    """'transformers', 'official' or 'samvit', from the key names."""
    if any(k.startswith(("vit.", "decoder.", "embeddings.")) for k in sd):
        return "transformers"
    if any(".mlp.fc1." in k for k in sd):
        return "official"
    if any(".mlp.lin1." in k for k in sd):
        return "samvit"
    raise CheckpointError("not an MAE checkpoint: no official (blocks.N.mlp.fc1), samvit (blocks.N.mlp.lin1) or "
                          "transformers (vit.*) keys")


def mae_state_from_official(sd: StateDict) -> StateDict:
    """Official models_mae names -> samvit names (only the MLP's fc1/fc2 differ)."""
    return {re.sub(r"\.mlp\.fc([12])\.", r".mlp.lin\1.", k): v for k, v in sd.items()}


def mae_state_from_transformers(sd: StateDict) -> StateDict:
    """transformers ViTMAEForPreTraining (file or in-memory layout) or ViTMAEModel names -> samvit names;
    separate q, k, v projections are concatenated into qkv. Unknown keys raise CheckpointError."""
    if any(k.startswith("embeddings.") for k in sd):  # ViTMAEModel: the encoder without the "vit." prefix
        sd = {"vit." + k: v for k, v in sd.items()}
    out: StateDict = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif re.match(r"^decoder\.decoder_(embed|norm|pred)\.(weight|bias)$", k):
            out[k[len("decoder."):]] = v
        elif (m := _HF_LAYER.match(k)) and m.group(3) in _HF_LAYER_PARTS:
            stack = "blocks" if m.group(1).startswith("vit.") else "decoder_blocks"
            part, kind = _HF_LAYER_PARTS[m.group(3)], m.group(4)
            if part in ("q", "k", "v"):
                qkv.setdefault((f"{stack}.{m.group(2)}.attn.qkv", kind), {})[part] = v
            else:
                out[f"{stack}.{m.group(2)}.{part}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"unexpected transformers ViTMAE keys: {', '.join(sorted(unknown)[:8])}"
                              + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else ""))
    for (name, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{name}: the checkpoint has {sorted(parts)} {kind} of q, k, v, not all three")
        out[f"{name}.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_mae_state(sd: StateDict, fmt: Optional[str] = None) -> Tuple[StateDict, str]:
    """Any supported MAE state dict -> (samvit names, the format it came in)."""
    sd = _strip_wrappers(dict(sd))
    fmt = fmt or detect_mae_format(sd)
    if fmt == "official":
        return mae_state_from_official(sd), fmt
    if fmt == "transformers":
        return mae_state_from_transformers(sd), fmt
    if fmt == "samvit":
        return sd, fmt
    raise ParameterError(f"unknown MAE checkpoint format {fmt!r}; expected one of {MAE_FORMATS}")


def _heads_for(width: int, decoder: bool) -> int:
    """The number of heads of the MAE preset with this encoder (or decoder) width."""
    known = {(c.decoder_embed_dim if decoder else c.embed_dim): (c.decoder_num_heads if decoder else c.num_heads)
             for c in MAE_PRESETS.values()}
    if width not in known:
        raise CheckpointError(f"cannot infer the number of {'decoder' if decoder else 'encoder'} heads for width "
                              f"{width} (known widths: {sorted(known)}); pass config= (an MAEConfig or a preset name)")
    return known[width]


def infer_mae_config(sd: StateDict) -> MAEConfig:
    """The MAEConfig of a samvit-named state dict: sizes from the tensors, heads from the preset of that width."""
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise CheckpointError("cannot infer the MAE model: no patch_embed.proj.weight / pos_embed tensor")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    hidden = sd["blocks.0.mlp.lin1.weight"].shape[0] if depth else 4 * dim
    fields = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
                  num_heads=_heads_for(dim, decoder=False), mlp_ratio=hidden / dim)
    same = [c for c in MAE_PRESETS.values() if all(getattr(c, f) == v for f, v in fields.items())]
    if "decoder_embed.weight" not in sd and same:  # encoder only: the decoder of the preset with this encoder
        fields.update({f: getattr(same[0], f) for f in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")})
    if "decoder_embed.weight" in sd:
        ddim = sd["decoder_embed.weight"].shape[0]
        ddepth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("decoder_blocks.")), default=-1)
        fields.update(decoder_embed_dim=ddim, decoder_depth=ddepth,
                      decoder_num_heads=_heads_for(ddim, decoder=True))
    name = next((n for n, c in MAE_PRESETS.items() if all(getattr(c, f) == v for f, v in fields.items())), "custom")
    return MAEConfig(**fields, name=name)


@dataclass
class MAELoadReport:
    """What a checkpoint gave the model: its format, the tensors loaded, the ones kept at the MAE init."""

    source: str
    format: str
    loaded: List[str]
    missing: List[str]

    def __str__(self) -> str:
        s = f"{self.source}: {self.format} MAE checkpoint, {len(self.loaded)} tensors loaded"
        if self.missing:
            blocks = sorted({int(k.split(".")[1]) for k in self.missing if k.startswith("decoder_blocks.")})
            rest = sorted(k.rsplit(".", 1)[0] if "." in k else k for k in self.missing
                          if not k.startswith("decoder_blocks."))
            what = sorted(set(rest)) + ([f"decoder_blocks.{blocks[0]}-{blocks[-1]}"] if blocks else [])
            s += (f"; the decoder is not in it ({len(self.missing)} tensors: {', '.join(what)}), "
                  "kept at the MAE init")
        return s


def read_mae_file(src: Union[str, os.PathLike]) -> StateDict:
    """The state dict of a file or of a transformers save_pretrained folder. The official training script's
    checkpoints also hold its argparse.Namespace ("args"): that one class is allowed to unpickle."""
    path = os.fspath(src)
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_checkpoint(path)[0]


def load_mae(src: Union[str, os.PathLike, StateDict], config: Union[MAEConfig, str, None] = None,
             fmt: Optional[str] = None, **overrides) -> Tuple[MaskedAutoencoder, MAELoadReport]:
    """A MaskedAutoencoder with the weights of an official, transformers or samvit MAE checkpoint (a file, a
    transformers folder or a state dict). The config is the one given, else inferred from the tensors;
    `overrides` replace config fields (e.g. norm_pix_loss=False for the official visualisation checkpoints)."""
    source = "state dict" if isinstance(src, dict) else os.fspath(src)
    sd, fmt = to_mae_state(src if isinstance(src, dict) else read_mae_file(src), fmt)
    cfg = mae_preset(config) if isinstance(config, str) else config
    cfg = cfg if cfg is not None else infer_mae_config(sd)
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    model = MaskedAutoencoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    if not any(_DECODER_KEYS.match(k) for k in sd):  # an encoder-only checkpoint: the decoder keeps its init
        expected_here = {k: s for k, s in expected.items() if not _DECODER_KEYS.match(k)}
    else:
        expected_here = expected
    check_keys(sd, expected_here, f"{source} ({fmt} MAE checkpoint) does not fit MAE model {cfg.name!r}:")
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sd:
                v.copy_(sd[k])
    return model, MAELoadReport(source, fmt, sorted(set(expected) & set(sd)), missing)
