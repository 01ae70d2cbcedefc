"""tune_allocator: freed tensor memory stays with the process (no fresh zeroed pages on the next forward)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = r"""
import sys, torch, samvit
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
tuned = samvit.tune_allocator()
before = rss_mib()
t = torch.empty(int(2.25 * 2**30) // 4)  # 2.25 GiB: over the largest trim threshold mallopt takes as a positive int
t.fill_(1.0)
del t
print(tuned, rss_mib() - before)
"""


def _freed_mib_kept(env_extra):
    env = dict(os.environ, **env_extra)
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    tuned, kept = out.stdout.split()
    return tuned == "True", float(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_process_keeps_freed_memory_even_over_2_gib():
    tuned, kept = _freed_mib_kept({})
    assert tuned and kept > 2000  # never trimmed: the next big tensor reuses these pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_samvit_no_tune_leaves_glibc_alone():
    tuned, kept = _freed_mib_kept({"SAMVIT_NO_TUNE": "1"})
    assert not tuned and kept < 100  # glibc's default: the block was mmapped and is returned at once
