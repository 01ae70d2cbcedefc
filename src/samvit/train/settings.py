"""Each training task's own settings as a dataclass (MAETask, SamTask, DistillTask): the task function's argument,
the CLI's defaults and, as JSON, the run's identity (TrainConfig.task); and run settings read from a YAML or JSON
file, a run's config.json among them (`samvit train TASK --config FILE`). No torch at import: the CLI's help reads the
defaults."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, Union

from ..config import MAE_PRESETS, EncoderConfig, TinyViTConfig, encoder_config_from_dict
from ..errors import InputError, ParameterError

# field metadata of a setting that says how a run is watched or fed, not what it computes: outside the identity
# (TrainConfig.task_extra), free to change on --resume
NOT_IDENTITY = {"identity": False}
TRAIN_PARTS = {"encoder": "image_encoder", "prompt": "prompt_encoder", "decoder": "mask_decoder"}
TARGETS = ("pixels", "teacher-features")
LOOP_INTERNAL = ("task", "task_extra", "inputs")  # TrainConfig fields that the task function fills, not a file


def _words(hint: Any) -> str:
    """A type hint in words, for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_words(a) for a in args)
    if origin in (tuple, list):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(value: Any, hint: Any) -> bool:
    """Whether value has the type hint's type (int is a number, bool is not; a list is a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_fits(value, a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict)
    return value is None if hint is type(None) else isinstance(value, hint)


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


def check_types(obj: Any) -> None:
    """ParameterError naming the field of a settings dataclass whose value has the wrong type; paths become str and
    lists of a tuple field tuples."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        if not _fits(value, hint):
            raise ParameterError(f"{f.name} must be {_words(hint)}, got {value!r}", f.name)
        setattr(obj, f.name, value)


def _names(value: Any) -> Any:
    """'a,b' or ['a', 'b'] -> ('a', 'b'); anything else as it is (check_types names it)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    return value


def parse_parts(spec: Union[str, Tuple[str, ...]]) -> Tuple[str, ...]:
    """--train encoder,prompt,decoder (any non-empty subset) -> the parts in that canonical order."""
    parts = _names(spec)
    bad = [p for p in parts if p not in TRAIN_PARTS]
    if bad or not parts:
        raise ParameterError(f"train {spec!r}: expected a comma-separated subset of {', '.join(TRAIN_PARTS)}",
                             "train")
    return tuple(p for p in TRAIN_PARTS if p in parts)


def check_trainable(parts: Tuple[str, ...], lora_rank: int, layer_decay: float, drop_path: float) -> None:
    """ParameterError unless the settings of what trains in SAM fit together (samvit.train.finetune.build_sam)."""
    if lora_rank < 0:
        raise ParameterError(f"lora_rank must be 0 (off) or more, got {lora_rank}", "lora_rank")
    if lora_rank and "encoder" in parts:
        raise ParameterError("lora_rank trains low-rank adapters instead of the encoder's weights: drop 'encoder' "
                             "from train (e.g. --train prompt,decoder --lora-rank 8)", "lora_rank")
    if not 0.0 < layer_decay <= 1.0:
        raise ParameterError(f"layer_decay must be in (0, 1], got {layer_decay}", "layer_decay")
    if not 0.0 <= drop_path < 1.0:
        raise ParameterError(f"drop_path must be in [0, 1), got {drop_path}", "drop_path")


def _at_least(obj: Any, name: str, low: float) -> None:
    if getattr(obj, name) < low:
        raise ParameterError(f"{name} must be at least {low}, got {getattr(obj, name)}", name)


def _encoder_config(value: Any, name: str) -> Any:
    """A mapping of encoder config fields (as a run's config.json holds it) -> EncoderConfig or TinyViTConfig."""
    if not isinstance(value, dict):
        return value
    try:
        return encoder_config_from_dict(value)
    except (TypeError, ValueError) as e:
        raise ParameterError(f"{name}: not an encoder config ({e})", name) from None


@dataclass
class MAETask:
    """MAE pre-training (samvit.train.mae.pretrain_mae): the preset `model` on `data` (a folder of images, or
    'synthetic': synthetic_size generated shapes). target 'teacher-features' with a teacher checkpoint is SAMI."""

    NAME: ClassVar[str] = "mae"
    BLR: ClassVar[float] = 1.5e-4  # the task's default --blr (MAE's)
    DERIVED: ClassVar[Tuple[str, ...]] = ("teacher_sha256",)  # identity entries computed by the task, not settings

    model: str
    data: str
    mask_ratio: Optional[float] = None  # None: the preset's (0.75)
    target: str = "pixels"
    teacher: Optional[str] = None  # a registry name or checkpoint file, with target 'teacher-features'
    synthetic_size: int = 1024
    vis_every: int = field(default=0, metadata=NOT_IDENTITY)  # RUN_DIR/recon_<step>.png every K steps (0: off)

    def __post_init__(self) -> None:
        check_types(self)
        if self.model not in MAE_PRESETS:
            raise ParameterError(f"model: unknown MAE preset {self.model!r}; known presets: {', '.join(MAE_PRESETS)}",
                                 "model")
        if self.target not in TARGETS:
            raise ParameterError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}", "target")
        if (self.target == "teacher-features") != (self.teacher is not None):
            raise ParameterError("target teacher-features needs teacher (a checkpoint), and teacher needs it",
                                 "teacher")
        if self.teacher is not None and self.vis_every > 0:
            raise ParameterError("vis_every draws pixel reconstructions; with target teacher-features there are none",
                                 "vis_every")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ParameterError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}", "mask_ratio")
        _at_least(self, "synthetic_size", 1)
        _at_least(self, "vis_every", 0)


@dataclass
class SamTask:
    """Fine-tuning SAM on masks (samvit.train.finetune.finetune_sam): the SAM `checkpoint` (registry name, file or
    state dict) on `data` (mask folder, COCO .json with `images`, or 'synthetic'); what trains, LoRA, prompts."""

    NAME: ClassVar[str] = "sam"
    BLR: ClassVar[float] = 8e-4  # SAM's, at batch 256
    DERIVED: ClassVar[Tuple[str, ...]] = ()

    checkpoint: Union[str, Dict[str, Any]]
    data: str
    images: Optional[str] = None  # the image folder of a COCO data .json
    # the encoder's preset or config (a mapping of its fields: read as one); None: from the checkpoint
    model: Union[None, str, Dict[str, Any], EncoderConfig, TinyViTConfig] = None
    train: Tuple[str, ...] = ("encoder", "prompt", "decoder")  # the parts that train (a subset of TRAIN_PARTS)
    lora_rank: int = 0  # LoRA adapters of this rank on the encoder instead of its weights (0: off)
    lora_targets: Tuple[str, ...] = ("qkv",)
    lora_alpha: Optional[float] = None  # None: the rank
    layer_decay: float = 1.0  # layer-wise lr decay of the encoder (1: none)
    drop_path: float = 0.0  # stochastic depth of the encoder's last block
    iterations: int = 8  # correction clicks after the first prompt (SAM's 8)
    masks_per_image: int = 8
    store: Optional[str] = None  # decoder-only training: the image embeddings from this EmbeddingStore
    synthetic_size: int = 256

    def __post_init__(self) -> None:
        self.train, self.lora_targets = _names(self.train), _names(self.lora_targets)
        self.model = _encoder_config(self.model, "model")
        check_types(self)
        from ..modeling.lora import LORA_TARGETS  # torch: only once a task is made, never for --help

        self.train = parse_parts(self.train)
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad or not self.lora_targets:
            raise ParameterError(f"lora_targets: unknown target {', '.join(map(repr, bad))}; expected some of "
                                 f"{', '.join(LORA_TARGETS)}", "lora_targets")
        check_trainable(self.train, self.lora_rank, self.layer_decay, self.drop_path)
        _at_least(self, "iterations", 0)
        _at_least(self, "masks_per_image", 1)
        _at_least(self, "synthetic_size", 1)
        if self.store is not None and ("encoder" in self.train or self.lora_rank):
            raise ParameterError("store reads the encoder's embeddings instead of running it: it needs a frozen "
                                 "encoder (no 'encoder' in --train, no --lora-rank)", "store")
        if self.store is not None and self.drop_path:
            raise ParameterError("drop_path acts in the encoder, which store does not run", "drop_path")


@dataclass
class DistillTask:
    """Distillation (samvit.train.distill.distill): `teacher` (registry name or checkpoint file) into `student` (a
    preset, a JSON file or a mapping of encoder config fields, or a config) on `data` (a folder or 'synthetic')."""

    NAME: ClassVar[str] = "distill"
    BLR: ClassVar[float] = 1.5e-4
    DERIVED: ClassVar[Tuple[str, ...]] = ("teacher_sha256",)

    teacher: str
    data: str
    student: Union[str, Dict[str, Any], EncoderConfig, TinyViTConfig] = "vit_t"
    teacher_store: Optional[str] = None  # the teacher's embeddings of data (default: RUN_DIR/teacher_store)
    cosine_weight: float = 0.0  # loss = MSE + W x (1 - cosine)
    synthetic_size: int = 256
    embed_batch_size: int = field(default=1, metadata=NOT_IDENTITY)  # the teacher's batch when it fills the store

    def __post_init__(self) -> None:
        self.student = _encoder_config(self.student, "student")
        check_types(self)
        if self.cosine_weight < 0:
            raise ParameterError(f"cosine_weight must not be negative, got {self.cosine_weight}", "cosine_weight")
        _at_least(self, "synthetic_size", 1)
        _at_least(self, "embed_batch_size", 1)


TaskSettings = Union[MAETask, SamTask, DistillTask]
TASKS: Dict[str, Type] = {c.NAME: c for c in (MAETask, SamTask, DistillTask)}


def default(cls: Type, name: str) -> Any:
    """The default of field `name` of a settings dataclass (dataclasses.MISSING when it has none)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def required(cls: Type) -> Tuple[str, ...]:
    """The fields of a settings dataclass without a default."""
    return tuple(f.name for f in dataclasses.fields(cls) if default(cls, f.name) is dataclasses.MISSING)


def task_record(task: TaskSettings, **derived: Any) -> Tuple[Dict, Dict]:
    """(the run's task identity: the task's name, its identity fields and what the task derived from them, as JSON
    values; the other fields), for TrainConfig.task and TrainConfig.task_extra."""
    values = json.loads(json.dumps(dataclasses.asdict(task)))
    ident = {f.name for f in dataclasses.fields(task) if f.metadata.get("identity", True)}
    return ({"task": task.NAME, **{k: v for k, v in values.items() if k in ident}, **derived},
            {k: v for k, v in values.items() if k not in ident})


def _load(path: str) -> Dict:
    """The mapping a .yaml/.yml or .json file holds."""
    if not os.path.isfile(path):
        raise InputError(f"--config {path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise InputError(f"--config {path}: expected a .yaml, .yml or .json file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--config {path}: not valid JSON ({e})") from None
    else:
        import yaml

        class Loader(yaml.SafeLoader):
            """YAML 1.1 reads 1e-3 (an exponent without a dot) as a string: here it is a number, as in JSON."""

        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
        try:
            data = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as e:
            raise InputError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of settings (name: value), got {type(data).__name__}")
    return data


def read_settings(path: str, cls: Type) -> Dict[str, Any]:
    """The settings a YAML or JSON file holds for task `cls`, as {field: value}: TrainConfig fields and the task's
    fields, flat or the task's under `task` (a run's config.json, whose "config" is read). Unknown names, another
    task's file and loop values of the wrong type raise InputError naming the file and the name (task values are
    checked by the task dataclass)."""
    from .loop import TrainConfig  # torch: at run time only

    raw = _load(path)
    if isinstance(raw.get("config"), dict) and "identity" in raw:  # a run's RUN_DIR/config.json
        raw = {k: v for k, v in raw["config"].items() if k != "inputs"}  # inputs: what that run wrote itself
    loop_hints = typing.get_type_hints(TrainConfig)
    loop_names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in LOOP_INTERNAL]
    task_names = [f.name for f in dataclasses.fields(cls)]
    values: Dict[str, Any] = {}

    def put(key: Any, value: Any) -> None:
        if key in values:
            raise InputError(f"--config {path}: {key} is given twice")
        if key in loop_names:
            hint = loop_hints[key]
            if not _fits(value, hint):
                raise InputError(f"--config {path}: {key} must be {_words(hint)}, got {value!r}")
            values[key] = tuple(value) if isinstance(value, list) and _is_tuple(hint) else value
        elif key in task_names:
            values[key] = value
        else:
            raise InputError(f"--config {path}: unknown setting {key!r} for `samvit train {cls.NAME}`; known: "
                             f"{', '.join(loop_names + task_names)}")

    def check_task(name: Any) -> None:
        if name != cls.NAME:
            raise InputError(f"--config {path}: task {name!r}: these are not the settings of `samvit train "
                             f"{cls.NAME}`")

    for key, value in raw.items():
        if key == "task" and isinstance(value, str):
            check_task(value)
        elif key in ("task", "task_extra"):  # a run's config: the task's settings inside
            if not isinstance(value, dict):
                raise InputError(f"--config {path}: {key} must be a mapping of {cls.NAME} settings, got {value!r}")
            for k, v in value.items():
                if k == "task":
                    check_task(v)
                elif k not in cls.DERIVED:
                    put(k, v)
        else:
            put(key, value)
    return values
