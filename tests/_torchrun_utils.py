"""Subprocesses in the tests: one thread each (fast on a busy machine), and 2-process torchrun (gloo, CPU) launches
of `samvit` for the embed and training tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List

RUNS_SCRIPT = """
import json, sys
import torch.distributed as dist
from samvit.cli import main
dist.init_process_group("gloo")  # one group for all the runs (the loop uses a group that exists)
for args in json.loads(sys.argv[1]):
    assert main(args) == 0, args
dist.destroy_process_group()
"""


def one_thread_env() -> dict:
    """The environment of a test's subprocess: one thread, unbuffered output, not inside an outer torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(args: List[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc ARGS...`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], capture_output=True, text=True, env=one_thread_env(), timeout=timeout)


def torchrun_samvit(tmp_path, runs: List[List[str]]) -> None:
    """`samvit` runs (argument lists) one after the other in the same 2 torchrun processes (one start-up for all)."""
    script = tmp_path / "runs.py"
    script.write_text(RUNS_SCRIPT)
    proc = torchrun([str(script), json.dumps(runs)])
    assert proc.returncode == 0, proc.stderr[-4000:]
