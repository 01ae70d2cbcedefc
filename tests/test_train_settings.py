"""The task settings dataclasses (samvit.train.settings) and `samvit train TASK --config FILE`: the CLI's defaults
are the dataclasses', a YAML or JSON file starts a run, flags override it, a run's config.json starts the same run
again under another --out, and bad files are one clear line (exit 2)."""
from __future__ import annotations

import json
import os

import argparse

import pytest

from samvit.cli import build_parser, main
from samvit.cli.train import run_settings
from samvit.errors import ParameterError
from samvit.train.loop import TrainConfig
from samvit.train.mae import pretrain_mae
from samvit.train.optim import LR_FLOOR
from samvit.train.settings import TASKS, DistillTask, MAETask, SamTask

from tests._finetune_utils import SMALL, write_tiny_checkpoint

MAE = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "8", "--batch-size", "2",
       "--quiet", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(argv):
    """(TrainConfig, task settings) of a `samvit train` command line, without running it."""
    return run_settings(build_parser().parse_args(argv))


def subparser(*names) -> argparse.ArgumentParser:
    """The parser of `samvit NAME ...`."""
    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def record(run) -> dict:
    with open(os.path.join(run, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# -- defaults: the dataclasses' fields, nowhere else

def test_cli_defaults_are_the_dataclass_defaults(tmp_path):
    out = str(tmp_path / "x")
    cfg, task = settings(["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--out", out,
                          "--batch-size", "2", "--steps", "1"])
    assert task == MAETask(model="mae_tiny", data="synthetic")
    assert task.synthetic_size == 1024 and task.target == "pixels" and task.mask_ratio is None
    # the loop's: TrainConfig's own, and the task's --blr, --lr-floor and --num-workers (0 for synthetic data)
    assert cfg == TrainConfig(out=out, batch_size=2, steps=1, blr=MAETask.BLR, lr_floor=LR_FLOOR["mae"],
                              num_workers=0)
    cfg, task = settings(["train", "sam", "--data", "synthetic", "--checkpoint", "ck.pth", "--out", out,
                          "--batch-size", "2", "--steps", "1"])
    assert task == SamTask(checkpoint="ck.pth", data="synthetic")
    assert task.train == ("encoder", "prompt", "decoder") and task.iterations == 8 and task.synthetic_size == 256
    assert cfg.blr == SamTask.BLR == 8e-4 and cfg.lr_floor == LR_FLOOR["sam_encoder"]
    cfg, task = settings(["train", "distill", "--data", "synthetic", "--teacher", "t.pth", "--out", out,
                          "--batch-size", "2", "--steps", "1"])
    assert task == DistillTask(teacher="t.pth", data="synthetic") and task.student == "vit_t"
    assert cfg.lr_floor == LR_FLOOR["distill"]
    # DataLoader workers: none for distill on the CPU (each costs a few hundred MiB; issue 21's 3 GB), some for
    # a folder of pictures elsewhere (MAE augments each one)
    (tmp_path / "pics").mkdir()
    pics = str(tmp_path / "pics")
    cfg, _ = settings(["train", "distill", "--data", pics, "--teacher", "t.pth", "--out", out, "--batch-size", "2",
                       "--steps", "1", "--device", "cpu"])
    assert cfg.num_workers == 0
    cfg, _ = settings(["train", "mae", "--data", pics, "--model", "mae_tiny", "--out", out, "--batch-size", "2",
                       "--steps", "1", "--device", "cpu"])
    assert cfg.num_workers >= 1
    # argparse holds no default of its own for a setting: None is "not given"
    for name in TASKS:
        for action in subparser("train", name)._actions:
            if action.dest != "help":
                assert action.default is None, (name, action.dest, action.default)
    help_text = " ".join(subparser("train", "sam").format_help().split())
    assert "default 8, SAM's" in help_text and "default encoder,prompt,decoder" in help_text


def test_the_dataclasses_check_their_fields():
    for make, field in ((lambda: MAETask(model="mae_tiny", data="synthetic", mask_ratio=1.5), "mask_ratio"),
                        (lambda: MAETask(model="mae_nope", data="synthetic"), "model"),
                        (lambda: MAETask(model="mae_tiny", data="synthetic", synthetic_size="8"), "synthetic_size"),
                        (lambda: MAETask(model="mae_tiny", data="synthetic", target="teacher-features"), "teacher"),
                        (lambda: SamTask(checkpoint="c", data="synthetic", train="decoder,neck"), "train"),
                        (lambda: SamTask(checkpoint="c", data="synthetic", lora_rank=4), "lora_rank"),
                        (lambda: SamTask(checkpoint="c", data="synthetic", train="decoder", lora_targets="qkv,ffn"),
                         "lora_targets"),
                        (lambda: SamTask(checkpoint="c", data="synthetic", iterations=2.5), "iterations"),
                        (lambda: SamTask(checkpoint="c", data="synthetic", store="s"), "store"),
                        (lambda: DistillTask(teacher="t", data="synthetic", cosine_weight=-1), "cosine_weight"),
                        (lambda: DistillTask(teacher="t", data="synthetic", embed_batch_size=0), "embed_batch_size"),
                        (lambda: DistillTask(teacher="t", data="synthetic", student={"depth": "two"}), "student")):
        with pytest.raises(ParameterError) as e:
            make()
        assert e.value.param == field and field.split("_")[0] in str(e.value), (field, e.value)
    # comma strings and lists become tuples; the parts in their canonical order
    task = SamTask(checkpoint="c", data="synthetic", train=["decoder", "prompt"], lora_targets="qkv, mlp")
    assert task.train == ("prompt", "decoder") and task.lora_targets == ("qkv", "mlp")


def test_python_api_takes_the_dataclass(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "a"), batch_size=2, steps=1, quiet=True, device="cpu")
    task = MAETask(model="mae_tiny", data="synthetic", synthetic_size=4, mask_ratio=0.5)
    assert pretrain_mae(cfg, task)["step"] == 1
    assert record(cfg.out)["identity"]["task"] == {"task": "mae", "model": "mae_tiny", "data": "synthetic",
                                                   "mask_ratio": 0.5, "target": "pixels", "teacher": None,
                                                   "synthetic_size": 4}
    assert record(cfg.out)["config"]["task_extra"] == {"vis_every": 0}  # watched, not the identity
    # the fields as keywords, and keywords over a dataclass's fields
    cfg_b = TrainConfig(out=str(tmp_path / "b"), batch_size=2, steps=1, quiet=True, device="cpu")
    pretrain_mae(cfg_b, task, mask_ratio=0.25)
    assert record(cfg_b.out)["identity"]["task"]["mask_ratio"] == 0.25
    cfg_c = TrainConfig(out=str(tmp_path / "c"), batch_size=2, steps=1, quiet=True, device="cpu")
    pretrain_mae(cfg_c, model="mae_tiny", data="synthetic", synthetic_size=4)
    assert record(cfg_c.out)["identity"]["task"]["mask_ratio"] == 0.75  # the preset's, recorded


# -- --config FILE

def test_yaml_config_starts_a_run_and_flags_override_it(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "mae.yaml"
    path.write_text(f"""# a run's settings
out: {out}
batch_size: 2
steps: 1
lr: 1e-3          # a number (YAML 1.1 would read a string)
betas: [0.9, 0.99]
data: synthetic
model: mae_tiny
synthetic_size: 4
mask_ratio: 0.5
quiet: true
device: cpu
""")
    assert main(["train", "mae", "--config", str(path), "--mask-ratio", "0.6", "--seed", "4"]) == 0
    rec = record(out)
    ident = rec["identity"]
    assert ident["lr"] == 1e-3 and ident["betas"] == [0.9, 0.99] and ident["seed"] == 4
    assert ident["task"]["mask_ratio"] == 0.6 and ident["task"]["synthetic_size"] == 4  # the flag over the file
    assert rec["config"]["steps"] == 1 and rec["config"]["quiet"] is True
    # the run's length is one setting: --epochs replaces the file's steps; required flags may come from the file
    cfg, task = settings(["train", "mae", "--config", str(path), "--epochs", "2", "--out", str(tmp_path / "o")])
    assert cfg.steps is None and cfg.epochs == 2 and cfg.out == str(tmp_path / "o") and task.model == "mae_tiny"


def test_a_runs_config_json_starts_it_again(tmp_path):
    """config.json as --config, with a new --out: the new run's identity is the old one's but for the flags given."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(MAE + ["--steps", "1", "--mask-ratio", "0.5", "--vis-every", "1", "--out", a]) == 0
    assert main(["train", "mae", "--config", os.path.join(a, "config.json"), "--out", b, "--lr", "2e-3"]) == 0
    ra, rb = record(a), record(b)
    assert {k for k in ra["identity"] if ra["identity"][k] != rb["identity"][k]} == {"lr"}
    assert rb["identity"]["lr"] == 2e-3 and rb["identity"]["task"] == ra["identity"]["task"]
    assert {k for k in ra["config"] if ra["config"][k] != rb["config"][k]} == {"out", "lr"}
    assert rb["config"]["task_extra"] == {"vis_every": 1} and os.path.exists(os.path.join(b, "recon_00000001.png"))
    # the same run folder again: refused without --resume, resumed with it
    assert main(["train", "mae", "--config", os.path.join(a, "config.json"), "--quiet"]) == 2
    assert main(["train", "mae", "--config", os.path.join(a, "config.json"), "--steps", "2", "--resume",
                 "--vis-every", "0"]) == 0  # vis_every is not the identity: it may change
    assert os.path.exists(os.path.join(a, "ckpt_00000002.pt"))


def test_sam_and_distill_config_json_round_trip(tmp_path):
    """train sam (an EncoderConfig JSON file as --model) and train distill (a student JSON file): config.json holds
    the configs themselves, and starts the same runs again."""
    ck = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    model = tmp_path / "small.json"
    model.write_text(SMALL.to_json())
    student = tmp_path / "student.json"
    student.write_text(json.dumps({"img_size": 128, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
                                   "global_attn_indexes": [1], "out_chans": 64, "name": "student"}))
    common = ["--data", "synthetic", "--synthetic-size", "4", "--batch-size", "2", "--steps", "1", "--quiet",
              "--device", "cpu"]
    runs = {"sam": ["train", "sam", "--checkpoint", ck, "--model", str(model), "--train", "decoder",
                    "--iterations", "1", "--masks-per-image", "2"] + common,
            "distill": ["train", "distill", "--teacher", ck, "--student", str(student), "--embed-batch-size", "2"]
            + common}
    for name, argv in runs.items():
        a, b = str(tmp_path / f"{name}_a"), str(tmp_path / f"{name}_b")
        assert main(argv + ["--out", a]) == 0
        os.remove(model if name == "sam" else student)  # config.json holds the config, not the file's name
        assert main(["train", name, "--config", os.path.join(a, "config.json"), "--out", b, "--seed", "1"]) == 0
        ra, rb = record(a), record(b)
        assert {k for k in ra["identity"] if ra["identity"][k] != rb["identity"][k]} == {"seed"}, name
        assert rb["config"]["task_extra"] == ra["config"]["task_extra"]
        assert os.path.exists(os.path.join(b, "final.pth" if name == "sam" else "student.safetensors"))
    assert record(str(tmp_path / "sam_a"))["identity"]["task"]["model"]["name"] == "tiny_ft"
    assert rb["identity"]["task"]["student"]["embed_dim"] == 32
    assert len(rb["identity"]["task"]["teacher_sha256"]) == 64 and rb["config"]["task_extra"]["embed_batch_size"] == 2


def test_bad_config_files_are_one_clear_line(tmp_path, capsys):
    def write(name, text):
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    out = ["--out", str(tmp_path / "run")]
    good = "batch_size: 2\nsteps: 1\ndata: synthetic\nmodel: mae_tiny\n"
    cases = [
        (str(tmp_path / "none.yaml"), "no such file"),
        (write("bad.yaml", "batch_size: [2\n"), "not valid YAML"),
        (write("bad.json", '{"batch_size": 2,}'), "not valid JSON"),
        (write("list.yaml", "- 1\n- 2\n"), "expected a mapping"),
        (write("conf.toml", "batch_size = 2\n"), "expected a .yaml, .yml or .json"),
        (write("unknown.yaml", good + "mask_ration: 0.5\n"), "unknown setting 'mask_ration'"),
        (write("type.yaml", good.replace("batch_size: 2", "batch_size: '2'")), "batch_size must be an integer"),
        (write("betas.json", json.dumps({"betas": [0.9], "data": "synthetic"})), "betas must be a list"),
        (write("task_type.yaml", good + "mask_ratio: high\n"), "mask_ratio must be a number or null"),
        (write("task_value.yaml", good + "mask_ratio: 1.5\n"), "mask_ratio must be in [0, 1)"),
        (write("sam.json", json.dumps({"task": "sam", "checkpoint": "x"})), "not the settings of `samvit train mae`"),
        (write("twice.json", json.dumps({"data": "synthetic", "task": {"data": "synthetic"}})), "data is given twice"),
    ]
    for path, words in cases:
        err = error_of(capsys, ["train", "mae", "--config", path] + out)
        assert words in err and path in err, (words, err)
    # a loop value out of range from the file: the loop's message, and the file named
    err = error_of(capsys, ["train", "mae", "--config", write("zero.yaml", good + "accum: 0\n")] + out)
    assert "--accum must be a positive number" in err and "zero.yaml" in err
    # required settings, in neither place
    err = error_of(capsys, ["train", "mae", "--config", write("short.yaml", "model: mae_tiny\n"), "--steps", "1"])
    assert "missing --out, --batch-size, --data" in err
    assert "--steps or --epochs" in error_of(capsys, ["train", "mae", "--data", "synthetic", "--model", "mae_tiny",
                                                      "--batch-size", "2"] + out)
    # a flag's bad value is still named as the flag
    assert "--mask-ratio must be in [0, 1)" in error_of(capsys, MAE + ["--steps", "1", "--mask-ratio", "2"] + out)
    assert not os.path.exists(tmp_path / "run")
