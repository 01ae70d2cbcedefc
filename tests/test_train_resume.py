"""Exact resume of `samvit train mae`: a run stopped (or SIGKILLed) and resumed equals an uninterrupted run bit for
bit: the same losses in log.jsonl, the same final parameters and optimizer state."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from samvit.cli import main
from samvit.train.ckpt import list_checkpoints, load_checkpoint

# 16 images of batch 2: 8 steps per epoch, so the runs cross epochs and stop mid-epoch
COMMON = ["train", "mae", "--data", "synthetic", "--model", "mae_tiny", "--synthetic-size", "16", "--batch-size", "2",
          "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "5", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the arithmetic of the one-thread subprocesses


def losses(run_dir) -> list:
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, fh)]


def final_state(run_dir) -> dict:
    return load_checkpoint(list_checkpoints(str(run_dir))[-1])


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and (a["epoch"], a["pos"]) == (b["epoch"], b["pos"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


def test_stop_and_resume_equals_straight_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(COMMON + ["--out", a, "--steps", "40"]) == 0
    assert main(COMMON + ["--out", b, "--steps", "20"]) == 0
    assert [s for s, _, _ in losses(b)] == list(range(1, 21))
    assert main(COMMON + ["--out", b, "--steps", "40", "--resume"]) == 0
    assert losses(a) == losses(b)  # every step's loss and lr, bitwise (floats round-trip through JSON)
    assert len(losses(a)) == 40 and losses(a)[-1][1] < losses(a)[0][1]
    assert_same_state(final_state(a), final_state(b))
    assert [os.path.basename(p) for p in list_checkpoints(b)] == ["ckpt_00000020.pt", "ckpt_00000040.pt"]


def test_sigkill_at_any_point_resumes_exactly(tmp_path):
    """A run killed with SIGKILL (after some checkpoints, wherever it was: in a step, in a save) resumes and ends
    with the parameters of a run that was never interrupted. Accumulation, clipping and bf16 autocast included."""
    extra = ["--steps", "24", "--ckpt-every", "3", "--keep-last", "2", "--accum", "2", "--clip-grad", "0.5",
             "--precision", "bf16"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "samvit"] + COMMON + extra + ["--out", killed], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        ckpts = list_checkpoints(killed) if os.path.isdir(killed) else []
        if ckpts and int(os.path.basename(ckpts[-1])[5:13]) >= 9:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped_at = int(os.path.basename(list_checkpoints(killed)[-1])[5:13])
    assert 9 <= stopped_at < 24, "the run was not killed mid-way"
    assert main(COMMON + extra + ["--out", killed, "--resume"]) == 0
    assert main(COMMON + extra + ["--out", straight]) == 0
    assert losses(killed) == losses(straight)  # entries logged after the last checkpoint were dropped and redone
    assert_same_state(final_state(killed), final_state(straight))
    assert not [f for f in os.listdir(killed) if ".tmp" in f]
