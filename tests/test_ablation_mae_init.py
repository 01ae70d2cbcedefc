"""benchmarks/ablation_mae_init.py's parts: the coins photograph as a mask folder, the warmup rule, the summary
over seeds (means, per-seed differences, wins)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest


def _script():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ablation_mae_init.py")
    spec = importlib.util.spec_from_file_location("ablation_mae_init", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coins_mask_folder_holds_the_24_coins(tmp_path):
    pytest.importorskip("skimage")
    from samvit.train.masks_data import MaskFolder

    src = MaskFolder(_script().write_coins(str(tmp_path / "coins")))
    rgb, masks, _ = src.load(0)
    assert len(src) == 1 and rgb.shape == (303, 384, 3) and len(masks) == 24
    areas = masks.sum((1, 2))
    assert areas.min() > 900 and areas.max() < 3500  # coins of 35-65 px across, not specks nor merged pairs
    grey = rgb[..., 0].astype(float)
    for m in masks:  # bright coins on a dark background
        assert grey[m].mean() > grey[~masks.any(0)].mean() + 50


def test_warmup_and_summary_over_seeds():
    s = _script()
    assert s.warmup_for(1500, 50) == 50 and s.warmup_for(200, 50) == 20 and s.warmup_for(50, 50) == 5
    assert s.metrics_of("1") == ("point1_miou", "box_miou", "clicks1_miou")
    rows = [{"init": init, "seed": seed, "dataset": "val", "ft_steps": 10, "n_objects": 7,
             "point1_miou": v, "box_miou": 0.5} for init, seed, v in
            [("mae", 0, 0.6), ("random", 0, 0.4), ("mae", 1, 0.3), ("random", 1, 0.5), ("mae", 2, 0.5),
             ("random", 2, 0.4)]]
    point, box = s.summary(rows, ("point1_miou", "box_miou"))
    assert point["seeds"] == [0, 1, 2] and point["mae_wins"] == 2 and box["mae_wins"] == 0
    assert np.allclose(point["mae_mean_sd"], (np.mean([0.6, 0.3, 0.5]), np.std([0.6, 0.3, 0.5], ddof=1)))
    assert np.allclose(point["diff_mean_sd"], (np.mean([0.2, -0.2, 0.1]), np.std([0.2, -0.2, 0.1], ddof=1)))


@pytest.mark.slow
def test_low_label_regime_end_to_end(tmp_path):
    """The whole script at toy size: a 2-step MAE run, two budgets (the second resumed), three evaluation sets."""
    import json
    import subprocess
    import sys

    pytest.importorskip("skimage")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "ablation_mae_init.py")
    out = tmp_path / "abl"
    args = ["--out", str(out), "--seeds", "0", "--mae-steps", "2", "--mae-images", "8", "--mae-batch", "4",
            "--train-images", "2", "--ft-batch", "2", "--val-images", "1", "--shifted-images", "1", "--coins",
            "--ft-steps", "2,3", "--clicks", "1"]
    done = subprocess.run([sys.executable, path, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3 and {r["dataset"] for r in rows} == {"val", "shifted", "coins"}
    assert {r["ft_steps"] for r in rows} == {2, 3} and {r["schedule"] for r in rows} == {"constant"}
    assert next(r for r in rows if r["dataset"] == "coins")["n_objects"] == 24
    assert {"ckpt_00000002.pt", "ckpt_00000003.pt"} <= set(os.listdir(out / "ft_mae_s0"))  # 2 steps, resumed to 3
    assert len(result["summary"]) == 3 * 2 * 3 and all(x["seeds"] == [0] for x in result["summary"])
