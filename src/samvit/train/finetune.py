"""Fine-tuning SAM on masks, on the shared loop: what trains (encoder, prompt encoder, mask decoder, LoRA
adapters), SAM's interactive prompt simulation and loss, decoder-only training from an embedding store, and the
export of the result in the official layout.

One step, per image of the batch and per sampled instance (SAM paper, section 3 and appendix A):
1. the first prompt is a point drawn uniformly from the mask or the mask's box with noise, at equal odds
   (drawn by the dataset, samvit.train.masks_data);
2. the decoder predicts; a single point gets the 3 multimask outputs and only the best (lowest loss) is trained;
   any other prompt gets the single-mask output;
3. `iterations` times: a correction click drawn uniformly from the error region of the previous prediction
   (foreground where it missed the mask, background where it spilled over), added to the prompt, with the
   previous low-res logits as the mask prompt; the decoder predicts again.
Every prediction's loss counts: 20 x focal + 1 x dice on the low-res mask logits + the IoU head's MSE; the
loss is the mean over the predictions, the masks of an image and the images of the batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoints.files import CONFIG_METADATA_KEY, DECODER_CONFIG_METADATA_KEY, write_tensors
from ..checkpoints.load import load_sam
from ..masks.automatic import mask_iou
from ..modeling.lora import add_lora, merge_lora
from ..modeling.sam import Sam
from ..errors import ParameterError
from ..runtime import is_main_process
from .launch import barrier, setup, teardown
from .loop import TrainConfig, train
from .losses import iou_loss, mask_loss
from .masks_data import MaskFolder, MaskSamples, open_masks
from .settings import TRAIN_PARTS, SamTask, check_trainable, parse_parts, task_record
from .validate import Validation, check_val_data

SKIPPED_FILE = "skipped.jsonl"  # images and annotations skipped during the run
SKIPPED_ON_OPEN_FILE = "skipped_on_open.jsonl"  # those skipped when --data was opened
FINAL_PTH, FINAL_SAFETENSORS = "final.pth", "final.safetensors"
BEST_METRIC = "point1_miou"  # the validation metric that picks RUN_DIR/best.pth and best.safetensors
# Masks decoded (and backpropagated) together in a training step's rounds: the step's graph holds this many masks
# x one round (a ViT-B decoder pass over 8 masks keeps about 1 GB for its backward at 1024).
MASKS_PER_PASS = 8


# ---- the model ----

def build_sam(checkpoint, model=None, train_parts: Sequence[str] = ("prompt", "decoder"), lora_rank: int = 0,
              lora_targets: Sequence[str] = ("qkv",), lora_alpha: Optional[float] = None, layer_decay: float = 1.0,
              drop_path: float = 0.0, kernel: str = "sdpa_chunked") -> Sam:
    """A Sam from a full SAM checkpoint (name, file or state dict; samvit.load_sam) set up for training: the parts
    not in train_parts frozen, LoRA adapters (rank lora_rank > 0) on the encoder's lora_targets, layer-wise lr
    decay and drop path (stochastic depth) in the encoder."""
    parts = parse_parts(train_parts)
    check_trainable(parts, lora_rank, layer_decay, drop_path)
    encoder, decoder = load_sam(checkpoint, model=model, kernel=kernel, dtype=torch.float32)  # trained: float32
    sam = Sam(encoder, decoder)
    sam.requires_grad_(False)
    for part in parts:
        getattr(sam, TRAIN_PARTS[part]).requires_grad_(True)
    if lora_rank:
        add_lora(sam.image_encoder.attention_blocks(), lora_rank, lora_targets, lora_alpha)
    sam.layer_decay = layer_decay
    if drop_path:
        sam.image_encoder.set_drop_path(drop_path)
    return sam.train()


# ---- prompt simulation ----

@torch.no_grad()
def correction_clicks(logits: torch.Tensor, targets: torch.Tensor, generators: Sequence[torch.Generator],
                      img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One correction click per mask: a low-res pixel drawn uniformly from the error region (prediction
    logits > 0 differs from the target), labelled 1 where the target is set (a miss) and 0 where it is not
    (a spill). (N,L,L) logits and targets -> coords (N,2) in the input frame (the pixel's centre), labels (N,)
    int32; a mask without error gets a padding point (label -1)."""
    n, low = logits.shape[0], logits.shape[-1]
    stride = img_size / low
    err = ((logits > 0) != targets.bool()).flatten(1).cpu()
    flat_t = targets.bool().flatten(1).cpu()
    coords = torch.zeros(n, 2)
    labels = torch.full((n,), -1, dtype=torch.int32)
    for i in range(n):
        where = err[i].nonzero()[:, 0]
        k = int(torch.randint(max(len(where), 1), (1,), generator=generators[i]))
        if len(where):
            j = int(where[k])
            y, x = divmod(j, low)
            coords[i] = torch.tensor([(x + 0.5) * stride - 0.5, (y + 0.5) * stride - 0.5])
            labels[i] = 1 if flat_t[i, j] else 0
    return coords.to(logits.device), labels.to(logits.device)


def sam_loss(iterations: int, img_size: int):
    """loss_fn(model, batch, grad_scale) for the loop: SAM's simulated interactive session (see the module
    docstring), run inside one forward of the model (Sam.forward's `session`). Each round but the last is
    backpropagated as soon as it is computed (the rounds are linked only through detached masks and clicks), so a
    step holds one round's graph, not all of them; the gradients are those of the whole session's loss."""
    if iterations < 0:
        raise ValueError(f"--iterations must be 0 or more, got {iterations}")

    def loss_fn(model: nn.Module, batch: Dict[str, torch.Tensor], grad_scale: Optional[float] = None
                ) -> Dict[str, torch.Tensor]:
        def session(emb: torch.Tensor, decode) -> Dict[str, torch.Tensor]:
            return interactive_rounds(decode, emb, batch, iterations, img_size, grad_scale)

        if "embedding" in batch:
            return model(image_embeddings=batch["embedding"], session=session)
        return model(images=batch["image"], session=session)

    loss_fn.backward_inside = True
    return loss_fn


def interactive_rounds(decode, emb: torch.Tensor, batch: Dict[str, torch.Tensor], iterations: int, img_size: int,
                       grad_scale: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """The first prompt and `iterations` correction rounds on a batch's valid masks: decode(embeddings, points,
    boxes, mask_inputs) -> (logits of all mask tokens, IoU predictions). Returns the mean losses ('loss',
    'focal_dice', 'iou_mse') and the IoU of the first and last predictions ('iou_first', 'iou_last').

    With grad_scale (under autograd) the masks go MASKS_PER_PASS at a time (they are independent), and every round
    of every part but the very last runs (its loss x grad_scale).backward() at once and frees its graph; the
    gradient they leave on the image embeddings is carried into the returned loss (emb . g), so that its backward
    (scaled by grad_scale by the caller) completes the session's gradient, through the encoder too when it trains.
    The returned values are those of the whole session either way."""
    b, k = batch["valid"].shape
    idx = batch["valid"].flatten().nonzero()[:, 0]
    image_of = idx // k
    n_valid = batch["valid"].sum(1).clamp(min=1)
    weight = 1.0 / (n_valid[image_of].float() * b)  # mean over an image's masks, then over the images
    targets = batch["targets"].flatten(0, 1)[idx].float()
    early = grad_scale is not None and torch.is_grad_enabled()
    n = len(idx)
    step = MASKS_PER_PASS if early else max(n, 1)
    parts = [torch.arange(c, min(n, c + step), device=idx.device) for c in range(0, n, step)] or [idx[:0]]
    emb_full = emb
    # every pass but the very last backpropagates at once; to a detached leaf when the embeddings need a gradient
    leaf = emb.detach().requires_grad_(True) if early and emb.requires_grad and (iterations or len(parts) > 1) \
        else None
    first_point = batch["point"].flatten(0, 1)[idx]
    boxes = batch["box"].flatten(0, 1)[idx]
    use_box = batch["use_box"].flatten()[idx]
    gens = [torch.Generator().manual_seed(int(s)) for s in batch["click_seed"].flatten()[idx].tolist()]
    sums = {"focal_dice": 0.0, "iou_mse": 0.0}
    ious: List = [0.0] * (iterations + 1)
    for pi, part in enumerate(parts):  # the masks are independent: a part of them at a time, all rounds each
        w_p, t_p, img_p, gens_p = weight[part], targets[part], image_of[part], [gens[i] for i in part.tolist()]
        pt_p, box_p, ub_p = first_point[part], boxes[part], use_box[part]
        groups = [(g, box) for g, box in ((torch.nonzero(~ub_p)[:, 0], False), (torch.nonzero(ub_p)[:, 0], True))
                  if len(g)]  # point-first and box-first prompts
        m = len(part)
        clicks = pt_p.new_zeros(m, 0, 2)
        click_labels = torch.zeros(m, 0, dtype=torch.int32, device=idx.device)
        prev: Optional[torch.Tensor] = None
        for it in range(iterations + 1):
            backward_now = early and not (pi == len(parts) - 1 and it == iterations)
            # each pass indexes the embeddings itself: a graph of its own, freed by its backward
            emb_it = (leaf if backward_now and leaf is not None else emb_full)[img_p]
            chosen = t_p.new_zeros(t_p.shape)
            per_mask = t_p.new_zeros(m)
            per_iou = t_p.new_zeros(m)
            for sel, box_group in groups:
                masks_in = None if prev is None else prev[sel]
                if box_group:
                    points = (clicks[sel], click_labels[sel]) if it else None
                    low, iou_pred = decode(emb_it[sel], points, box_p[sel], masks_in)
                else:
                    coords = torch.cat([pt_p[sel, None], clicks[sel]], 1)
                    labels = torch.cat([click_labels.new_ones(len(sel), 1), click_labels[sel]], 1)
                    low, iou_pred = decode(emb_it[sel], (coords, labels), None, masks_in)
                multimask = it == 0 and not box_group  # one point: ambiguous, the best of the 3 masks trains
                low, iou_pred = (low[:, 1:], iou_pred[:, 1:]) if multimask else (low[:, :1], iou_pred[:, :1])
                t = t_p[sel, None].expand_as(low)
                losses = mask_loss(low, t)  # (n_sel, M)
                best = losses.argmin(1)
                rows = torch.arange(len(sel), device=sel.device)
                per_mask[sel] = losses[rows, best].to(per_mask.dtype)
                per_iou[sel] = iou_loss(iou_pred, low, t).mean(1).to(per_iou.dtype)
                chosen[sel] = low[rows, best].float()
            fd, im = (w_p * per_mask).sum(), (w_p * per_iou).sum()
            if backward_now and fd.requires_grad:
                ((fd + im) / (iterations + 1) * grad_scale).backward()
                fd, im = fd.detach(), im.detach()
            sums["focal_dice"] = sums["focal_dice"] + fd
            sums["iou_mse"] = sums["iou_mse"] + im
            ious[it] = ious[it] + (w_p * mask_iou(chosen.detach() > 0, t_p).to(w_p.dtype)).sum()
            if it < iterations:
                xy, lab = correction_clicks(chosen, t_p, gens_p, img_size)
                clicks = torch.cat([clicks, xy[:, None]], 1)
                click_labels = torch.cat([click_labels, lab[:, None]], 1)
                prev = chosen.detach()[:, None]
    out = {k: v / (iterations + 1) for k, v in sums.items()}
    out["loss"] = out["focal_dice"] + out["iou_mse"]
    if leaf is not None and leaf.grad is not None:  # the earlier passes' gradient on the embeddings, on its way
        carry = (emb_full * (leaf.grad / grad_scale).to(emb_full.dtype)).sum()
        out["loss"] = out["loss"] + (carry - carry.detach())  # adds the gradient, not the value
    out["iou_first"], out["iou_last"] = ious[0], ious[-1]
    return out


# ---- decoder-only training from an embedding store ----

def ensure_store(store: str, source, checkpoint: str, model=None, device: Optional[str] = None,
                 batch_size: int = 1, quiet: bool = False):
    """The EmbeddingStore at `store` holding every image of `source`, embedded by the checkpoint's encoder with
    samvit's embed pipeline where missing (a store made with another checkpoint or model is refused). Every
    process of a torchrun job embeds its share; returns the opened store."""
    from ..checkpoints.load import load_encoder
    from ..checkpoints.registry import checkpoint_sha256, resolve_checkpoint
    from ..embeddings.pipeline import StoreSink, embed
    from ..embeddings.store import EmbeddingStore

    paths = [source.path(i) for i in range(len(source))]
    if any(p is None for p in paths):
        raise ValueError("--store needs image files: write the synthetic set out first "
                         "(samvit.train.masks_data.save_mask_folder) or give a mask folder / COCO file")
    path = resolve_checkpoint(checkpoint, progress=False if quiet else None)
    procs = setup(device)
    try:
        existing = EmbeddingStore(store) if os.path.isdir(store) else None
        keys = [source.key(i) for i in range(len(source))]
        if existing is None or any(key not in existing for key in keys):
            encoder = load_encoder(model, path, device=procs.device, dtype=torch.float32)
            report = embed(encoder, list(zip(paths, keys)), StoreSink(store, checkpoint_sha256(path)),
                           batch_size=batch_size, workers=0, progress=False if quiet else None)
            if procs.main and not quiet:
                print(f"samvit train: embedding store {store}: {report.embedded} embedded, {report.skipped} "
                      f"already there, {len(report.failed)} failed ({report.seconds:.1f} s)")
        barrier(procs)
        opened = EmbeddingStore(store)
        sha = checkpoint_sha256(path)
        if opened.identity["checkpoint_sha256"] != sha:
            raise ValueError(f"--store {store}: made with another checkpoint (sha256 "
                             f"{opened.identity['checkpoint_sha256'][:16]}..., this one {sha[:16]}...)")
        return opened
    finally:
        teardown(procs)


# ---- export ----

def export_model(sam: Sam, run_dir: str, name: str = "final") -> Tuple[str, str]:
    """Write RUN_DIR/final.pth (the official segment-anything state dict: LoRA merged, float32, integer buffers
    as they are) and RUN_DIR/final.safetensors (the same tensors, with the encoder and decoder configs as
    metadata); `name` replaces 'final' (best: the best validation's)."""
    from ..checkpoints.files import atomic_write

    merge_lora(sam)
    sd = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()  # counters stay
          for k, v in sam.state_dict().items()}  # integers (TinyViT's BatchNorm num_batches_tracked)
    pth = os.path.join(run_dir, name + ".pth")
    with atomic_write(pth) as tmp:
        torch.save(sd, tmp)
    st = os.path.join(run_dir, name + ".safetensors")
    meta = {CONFIG_METADATA_KEY: sam.config.to_json(), "format": "samvit",
            DECODER_CONFIG_METADATA_KEY: sam.decoder_config.to_json()}
    write_tensors(st, sd, meta)
    return pth, st


# ---- validation ----

def sam_validation(cfg: TrainConfig, build, data_inputs: Tuple[Optional[str], ...]) -> Validation:
    """`samvit evaluate`'s metrics (samvit.train.evaluate: 1 point, 1 box, 1/3/5 correction clicks) on the mask
    folder cfg.val_data (the first cfg.val_limit images), the model in float32; best: the highest point1_miou;
    best.pth and best.safetensors as export_model writes final.*."""
    from .evaluate import DEFAULT_CLICKS, evaluate

    folder = check_val_data(cfg.val_data, data_inputs, cfg.out)
    source = MaskFolder(folder, "--val-data")

    def run(sam: Sam) -> Dict[str, float]:
        from ..masks.predictor import Predictor

        try:
            result = evaluate(Predictor(sam.image_encoder, sam.as_decoder()), {"val": source}, DEFAULT_CLICKS,
                              cfg.val_limit)
        finally:
            sam.image_encoder.release_workspace()  # the inference path's buffers: not kept beside training's
        if not result["n_objects"]:
            why = ", ".join(f"{n} x {r}" for r, n in result["skipped"].items()) or "every mask is empty"
            raise ParameterError(f"--val-data {cfg.val_data}: no usable object to validate on ({why})")
        return {k: v for k, v in result.items() if k.endswith("_miou") or k in ("n_objects", "n_images")}

    def save_best(sam: Sam) -> List[str]:
        copy = build()  # on the CPU; the LoRA adapters are merged into the copy, not into the model that trains
        copy.load_state_dict(sam.state_dict())
        return list(export_model(copy, cfg.out, "best"))

    return Validation(run, BEST_METRIC, True, save_best, {"val_data": folder, "val_limit": cfg.val_limit})


# ---- the task ----

def finetune_sam(cfg: TrainConfig, task: Optional[SamTask] = None, **settings) -> Dict:
    """Fine-tune a SAM checkpoint on masks with `task`'s settings (or SamTask(**settings); settings also replace
    fields of task); see the module docstring and TrainConfig. Writes RUN_DIR/final.pth and
    RUN_DIR/final.safetensors at the end; returns the loop's summary with their paths."""
    task = SamTask(**settings) if task is None else dataclasses.replace(task, **settings)

    def absolute(path: Optional[str]) -> Optional[str]:
        return os.path.abspath(path) if path else path

    ck = task.checkpoint
    task = dataclasses.replace(  # as the run's identity records it: absolute paths (a registry name stays a name)
        task, data=task.data if task.data == "synthetic" else absolute(task.data), images=absolute(task.images),
        store=absolute(task.store), checkpoint=absolute(ck) if isinstance(ck, str) and os.path.exists(ck) else ck)

    def build() -> Sam:
        return build_sam(task.checkpoint, task.model, task.train, task.lora_rank, task.lora_targets, task.lora_alpha,
                         task.layer_decay, task.drop_path)

    probe = build()  # checks the checkpoint and the options before the run directory is written
    img_size, low_res = probe.img_size, probe.low_res_size
    del probe
    source = open_masks(task.data, task.images, task.synthetic_size, synthetic_px=img_size, seed=cfg.seed)
    identity, extra = task_record(task if isinstance(ck, str) else dataclasses.replace(task, checkpoint="state dict"))
    cfg = dataclasses.replace(cfg, task=identity, task_extra=extra)
    validation = sam_validation(cfg, build, (task.data, task.images)) if cfg.val_data else None
    opened = ensure_store(task.store, source, task.checkpoint, task.model, cfg.device, quiet=cfg.quiet) \
        if task.store else None
    dataset = MaskSamples(source, img_size, low_res, task.masks_per_image, cfg.seed, opened,
                          report=os.path.join(cfg.out, SKIPPED_FILE))
    if source.problems and not cfg.quiet and is_main_process():
        print(f"samvit train: skipped while reading --data: {dict(source.problems)}")
    hooks = [_ReportProblems(source, cfg.out)] if source.missing else []
    result = train(cfg, build, dataset, sam_loss(task.iterations, img_size), hooks, validation)
    if is_main_process():
        from .ckpt import latest_checkpoint

        state = latest_checkpoint(cfg.out)
        sam = build()
        sam.load_state_dict(state["model"])
        result["final_pth"], result["final_safetensors"] = export_model(sam, cfg.out)
        if not cfg.quiet:
            print(f"samvit train: wrote {result['final_pth']} and {result['final_safetensors']}")
    return result


class _ReportProblems:
    """Hook: after the first step (the run directory exists), the main process lists the images and annotations
    the source skipped while it was opened, in RUN_DIR/skipped_on_open.jsonl (rewritten, so a resume does not
    repeat them)."""

    def __init__(self, source, run_dir: str) -> None:
        self.source, self.path, self.done = source, os.path.join(run_dir, SKIPPED_ON_OPEN_FILE), False

    def __call__(self, step: int, model: nn.Module) -> None:
        if self.done:
            return
        self.done = True
        if is_main_process():
            import json

            from ..checkpoints.files import atomic_write

            with atomic_write(self.path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                for item, reason in self.source.missing:
                    fh.write(json.dumps({"item": item, "reason": reason}) + "\n")
