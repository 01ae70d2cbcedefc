"""Processes and devices: torch.distributed under torchrun, seeding, DDP / FSDP2 wrapping, precision."""
from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..runtime import init_distributed
from ..errors import ParameterError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Processes:
    """Where this process stands: its device, rank and the number of processes."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # setup() created the process group (and teardown() destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: Optional[str] = None) -> Processes:
    """Initialise torch.distributed when run under torchrun (nccl on cuda:LOCAL_RANK, gloo on CPU); a process
    group that already exists is used as it is."""
    existed = dist.is_available() and dist.is_initialized()
    dev, env = init_distributed(device)
    if env is None:
        return Processes(dev)
    rank, world, local_rank = env
    return Processes(dev, rank, world, local_rank, owns_group=not existed)


def teardown(procs: Processes) -> None:
    """Destroy the process group if setup() created it."""
    if procs.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's random."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def check_precision(precision: str, model_config=None, fsdp: bool = False) -> None:
    """fp16 only where it is safe: refused for ViT-H-wide models (model_config.embed_dim >= 1280: their
    activations overflow float16, segment-anything issue 540) and with FSDP (whose sharded gradients the plain
    GradScaler cannot check)."""
    if precision not in PRECISIONS:
        raise ParameterError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision != "fp16":
        return
    cfg = model_config
    width = getattr(cfg, "embed_dim", 0)
    if width >= 1280:
        raise ParameterError(f"--precision fp16 is refused for {getattr(cfg, 'name', 'this model')!r} (width {width}): "
                             "ViT-H activations overflow float16 (segment-anything issue 540); use --precision bf16")
    if fsdp:
        raise ParameterError("--precision fp16 is not supported with --fsdp (the gradient scaler would see only this "
                             "process's shard); use --precision bf16")


def autocast(device: torch.device, precision: str):
    """The forward-pass context of a precision: autocast to bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The modules FSDP2 shards one by one: model.fsdp_units() if the model says, else the entries of every
    ModuleList attribute whose name ends in 'blocks' (encoder and decoder blocks)."""
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            units.extend(child)
    return units


def check_fsdp(procs: Processes, fsdp: bool) -> None:
    if fsdp and not procs.distributed:
        raise ParameterError("--fsdp shards the model over processes: run under torchrun with --nproc_per_node 2 or "
                             "more (one process trains without it)")


def wrap(model: nn.Module, procs: Processes, fsdp: bool = False) -> nn.Module:
    """DDP over the processes (the default), or FSDP2: fully_shard on each block, then on the root. One process:
    the model as it is."""
    check_fsdp(procs, fsdp)
    if not procs.distributed:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ParameterError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
                                 f"torch {torch.__version__}") from None

        # the model returns views (pred[:, 1:]) that nothing modifies in place: FSDP2's warning does not apply
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        for unit in fsdp_units(model):
            fully_shard(unit)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # parameters broadcast through expand/repeat (MAE's mask token) get gradients whose size-1 dimensions have
    # other strides than DDP's bucket: a harmless copy of a few values that DDP warns about at every start
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [procs.device.index] if procs.device.type == "cuda" else None
    # buffers are equal on every process (same seed or checkpoint) and nothing updates them; broadcasting them in
    # every forward would also be a collective that deadlocks a task calling forward a varying number of times
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (an FSDP2 model is its own module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, sync: bool):
    """Context of one micro-batch's backward: skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on
    all but the last micro-batch of an accumulation."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_gather(obj, procs: Processes) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in one process)."""
    if not procs.distributed:
        return [obj]
    out = [None] * procs.world
    dist.all_gather_object(out, obj)
    return out


def mean_over_processes(x: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The mean of a tensor over the processes."""
    if procs.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= procs.world
    return x


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()
