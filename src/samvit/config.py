"""EncoderConfig and its named presets (official SAM checkpoints and the spec's own arrangement), DecoderConfig."""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Optional, Tuple, Type, TypeVar, Union

from .errors import ParameterError

C = TypeVar("C", bound="JsonFields")


class JsonFields:
    """The JSON form of a config dataclass: to_dict / to_json, and from_dict / from_json refusing unknown fields."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: Type[C], d: dict) -> C:
        if not isinstance(d, dict):
            raise ParameterError(f"expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ParameterError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls: Type[C], s: str) -> C:
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class ViTFields(JsonFields):
    """The fields both ViTs have (the SAM image encoder, the MAE that pre-trains it): patch grid and width."""

    # the patch grid
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3

    @property
    def grid_size(self) -> int:
        """Side of the token grid (64 for 1024 / 16, 14 for 224 / 16)."""
        return self.img_size // self.patch_size

    # the transformer
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class EncoderConfig(ViTFields):
    """Every architectural choice of the SAM ViT image encoder (img_size ... mlp_ratio: ViTFields)."""

    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14  # 0 = every block global
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)  # 0-based blocks with global attention
    out_chans: Optional[int] = 256  # neck output channels; None = no neck, (B,64,64,C) features out
    norm_eps: float = 1e-6
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        if self.embed_dim % self.num_heads:
            raise ParameterError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ParameterError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise ParameterError(f"global_attn_indexes {bad} are outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def block_window_size(self, i: int) -> int:
        """Window size of block i (0 = global attention)."""
        return 0 if i in self.global_attn_indexes else self.window_size

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    family = "vit"  # the encoder family (TinyViTConfig: "tinyvit"); not a field


# Sane bounds for every field (configs also come from files): (low, high) for numbers.
_INT_BOUNDS = {"img_size": (1, 16384), "patch_size": (1, 16384), "in_chans": (1, 64), "embed_dim": (1, 65536),
               "depth": (1, 1024), "num_heads": (1, 65536), "window_size": (0, 16384), "out_chans": (1, 65536)}
_FLOAT_BOUNDS = {"mlp_ratio": (1e-3, 64.0), "norm_eps": (1e-12, 1.0)}


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_fields(cfg: "EncoderConfig") -> None:
    """Raise ValueError naming a field of the wrong type or out of bounds (before any arithmetic on it)."""
    for name, (lo, hi) in _INT_BOUNDS.items():
        v = getattr(cfg, name)
        if name == "out_chans" and v is None:
            continue
        if not _is_int(v) or not lo <= v <= hi:
            raise ParameterError(f"{name} {v!r}: expected an integer from {lo} to {hi}")
    for name, (lo, hi) in _FLOAT_BOUNDS.items():
        v = getattr(cfg, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not lo <= v <= hi:  # NaN fails too
            raise ParameterError(f"{name} {v!r}: expected a number from {lo:g} to {hi:g}")
    for name in ("qkv_bias", "use_abs_pos", "use_rel_pos"):
        if type(getattr(cfg, name)) is not bool:
            raise ParameterError(f"{name} {getattr(cfg, name)!r}: expected true or false")
    g = cfg.global_attn_indexes
    if not isinstance(g, (list, tuple, range)) or len(g) > 1024 or not all(_is_int(i) for i in g):
        raise ParameterError(f"global_attn_indexes {str(g)[:60]}: expected a list of block numbers")
    if not isinstance(cfg.name, str):
        raise ParameterError(f"name {cfg.name!r}: expected a text")


PRESETS = {
    # The three released SAM image encoders (segment-anything build_sam.py).
    "vit_b": EncoderConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), name="vit_b"),
    "vit_l": EncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), name="vit_l"),
    "vit_h": EncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), name="vit_h"),
    # The spec's own arrangement: 8x8 windows in blocks 1-16, global in 17-32, no relative position, no neck.
    # No released weights exist for it; it is for training.
    "vit_h_spec": EncoderConfig(
        embed_dim=1280, depth=32, num_heads=16, use_rel_pos=False, window_size=8,
        global_attn_indexes=tuple(range(16, 32)), out_chans=None, name="vit_h_spec",
    ),
    # Distillation students (MobileSAM / EfficientSAM sizes): SAM's arrangement at ViT-Ti / ViT-S width, the same
    # neck, so the (B,256,64,64) embedding fits the released prompt encoder and mask decoder unchanged.
    "vit_t": EncoderConfig(embed_dim=192, depth=12, num_heads=3, global_attn_indexes=(2, 5, 8, 11), name="vit_t"),
    "vit_s": EncoderConfig(embed_dim=384, depth=12, num_heads=6, global_attn_indexes=(2, 5, 8, 11), name="vit_s"),
}

# Presets with no released SAM weights: they are for training (`samvit train distill`, `samvit train mae`).
NO_RELEASED_WEIGHTS = frozenset({"vit_h_spec", "vit_t", "vit_s"})


@dataclass(frozen=True)
class TinyViTConfig(JsonFields):
    """MobileSAM's TinyViT image encoder: a conv stem and MBConv stage, then windowed-attention stages (one entry
    per stage in embed_dims ... window_sizes; stage 0's head count and window are unused), stride 16 overall,
    SAM's neck. `family` tells its JSON from an EncoderConfig's."""

    img_size: int = 1024
    in_chans: int = 3
    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    family: str = "tinyvit"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.family != "tinyvit":
            raise ParameterError(f"family {self.family!r}: a TinyViTConfig's family is 'tinyvit'")
        for f in ("embed_dims", "depths", "num_heads", "window_sizes"):
            v = getattr(self, f)
            if not isinstance(v, (list, tuple)) or not all(_is_int(i) and 1 <= i <= 65536 for i in v):
                raise ParameterError(f"{f} {str(v)[:60]}: expected a list of positive integers, one per stage")
            object.__setattr__(self, f, tuple(int(i) for i in v))
        n = len(self.embed_dims)
        if n < 2 or any(len(getattr(self, f)) != n for f in ("depths", "num_heads", "window_sizes")):
            raise ParameterError(f"embed_dims, depths, num_heads and window_sizes must each have one entry per stage "
                             f"(at least 2), got {n}, {len(self.depths)}, {len(self.num_heads)}, "
                             f"{len(self.window_sizes)}")
        bad = [i for i in range(1, n) if self.embed_dims[i] % self.num_heads[i]]
        if bad:
            raise ParameterError(f"stage {bad[0]}: width {self.embed_dims[bad[0]]} is not divisible by its "
                             f"{self.num_heads[bad[0]]} heads")
        for name, lo, hi in (("img_size", 1, 16384), ("in_chans", 1, 64), ("local_conv_size", 1, 31),
                             ("out_chans", 1, 65536)):
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise ParameterError(f"{name} {v!r}: expected an integer from {lo} to {hi}")
        for name in ("mlp_ratio", "mbconv_expand_ratio"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 1e-3 <= v <= 64:
                raise ParameterError(f"{name} {v!r}: expected a number from 0.001 to 64")
        if self.img_size % self.patch_size:
            raise ParameterError(f"img_size {self.img_size} is not a multiple of the encoder's stride {self.patch_size}")
        if not isinstance(self.name, str):
            raise ParameterError(f"name {self.name!r}: expected a text")

    @property
    def patch_size(self) -> int:
        """The stride of the embedding grid: 4 (stem) x 2 per patch merging but the last (16 with 4 stages)."""
        return 4 * 2 ** (len(self.embed_dims) - 2)

    @property
    def grid_size(self) -> int:
        """Side of the embedding grid (64 for 1024 input)."""
        return self.img_size // self.patch_size

    @property
    def embed_dim(self) -> int:
        """Width of the features before the neck (the last stage's)."""
        return self.embed_dims[-1]

    @property
    def depth(self) -> int:
        """Blocks in all stages."""
        return sum(self.depths)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in ("embed_dims", "depths", "num_heads", "window_sizes"):
            d[f] = list(d[f])
        return d


TINYVIT_PRESETS = {
    # MobileSAM's encoder (mobile_sam.pt; segment-anything-hq's sam_model_registry["vit_tiny"]): TinyViT-5M.
    "tinyvit_5m": TinyViTConfig(name="tinyvit_5m"),
}
# Other names a preset goes by: the official registries call MobileSAM's encoder "vit_tiny" (not samvit's vit_t,
# the ViT-Ti distillation student).
PRESET_ALIASES = {"vit_tiny": "tinyvit_5m"}

AnyEncoderConfig = Union[EncoderConfig, TinyViTConfig]


def encoder_config_from_dict(d: dict) -> AnyEncoderConfig:
    """An EncoderConfig, or a TinyViTConfig when d says family "tinyvit" (samvit metadata of either family)."""
    if isinstance(d, dict) and d.get("family", "vit") == "tinyvit":
        return TinyViTConfig.from_dict(d)
    if isinstance(d, dict) and d.get("family", "vit") == "vit":
        d = {k: v for k, v in d.items() if k != "family"}
    return EncoderConfig.from_dict(d)


def encoder_config_from_json(s: str) -> AnyEncoderConfig:
    """encoder_config_from_dict of a JSON text."""
    return encoder_config_from_dict(json.loads(s))


def preset(name: str, **overrides) -> AnyEncoderConfig:
    """Return the named preset (a ViT EncoderConfig, or a TinyViTConfig for tinyvit_5m / vit_tiny), optionally
    with some fields replaced."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS and name not in TINYVIT_PRESETS:
        raise ParameterError(f"unknown model preset {name!r}; known presets: "
                         f"{', '.join([*PRESETS, *TINYVIT_PRESETS, *PRESET_ALIASES])}")
    cfg = PRESETS[name] if name in PRESETS else TINYVIT_PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclass(frozen=True)
class DecoderConfig(JsonFields):
    """Architecture of the prompt encoder and mask decoder (defaults: every released SAM model)."""

    embed_dim: int = 256  # prompt / transformer width = encoder out_chans
    image_embedding_size: int = 64  # side of the image embedding grid
    input_image_size: int = 1024  # side of the padded encoder input
    mask_in_chans: int = 16
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    hq_vit_dim: int = 0  # HQ-SAM: width of the encoder's early features its mask decoder fuses; 0 = plain SAM

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # configs also come from files: every field a sane positive integer
            v = getattr(self, f.name)
            lo = 0 if f.name == "hq_vit_dim" else 1
            if not _is_int(v) or not lo <= v <= 65536:
                raise ParameterError(f"decoder {f.name} {v!r}: expected an integer from {lo} to 65536")
        if self.embed_dim % self.num_heads:
            raise ParameterError(f"decoder embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")

    def replace(self, **changes) -> "DecoderConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MAEConfig(ViTFields):
    """The masked autoencoder (He et al. 2022) that pre-trains the encoder: a plain ViT with a class token and
    fixed sine-cosine positions, a narrow decoder, a per-patch pixel loss (patch_size ... mlp_ratio: ViTFields)."""

    img_size: int = 224  # in its place among ViTFields, with MAE's default
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    norm_eps: float = 1e-6
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for width, heads, what in ((self.embed_dim, self.num_heads, "embed_dim"),
                                   (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim")):
            if width % heads:
                raise ParameterError(f"{what} {width} is not divisible by its number of heads {heads}")
            if width % 4:
                raise ParameterError(f"{what} {width} is not a multiple of 4 (the 2-D sine-cosine position embedding)")
        if self.img_size % self.patch_size:
            raise ParameterError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ParameterError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


MAE_PRESETS = {
    # The widths of SAM's encoders, at 224 px / patch 16 (the official MAE ViT-H is patch 14; SAM's is 16).
    "mae_vit_b": MAEConfig(embed_dim=768, depth=12, num_heads=12, name="mae_vit_b"),
    "mae_vit_l": MAEConfig(embed_dim=1024, depth=24, num_heads=16, name="mae_vit_l"),
    "mae_vit_h": MAEConfig(embed_dim=1280, depth=32, num_heads=16, name="mae_vit_h"),
    # For tests and demos on CPU: the same 224/16 geometry (so it transfers to a 1024/16 encoder), width 64.
    "mae_tiny": MAEConfig(embed_dim=64, depth=3, num_heads=2, decoder_embed_dim=64, decoder_depth=2,
                          decoder_num_heads=2, name="mae_tiny"),
}


def mae_preset(name: str, **overrides) -> MAEConfig:
    """Return the named MAE preset, optionally with some fields replaced."""
    if name not in MAE_PRESETS:
        raise ParameterError(f"unknown MAE preset {name!r}; known presets: {', '.join(MAE_PRESETS)}")
    cfg = MAE_PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
