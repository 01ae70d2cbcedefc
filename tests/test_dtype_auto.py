"""dtype="auto" (opt-in; float32 is the default): bfloat16 where the device computes it natively, float32 elsewhere
(detection mocked both ways)."""
from __future__ import annotations

import warnings

import pytest
import torch

import samvit
from samvit import runtime


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set whether the CPU 'has' AVX512-BF16 / AMX; SAMVIT_DTYPE (float32 in the test session) unset."""
    monkeypatch.delenv("SAMVIT_DTYPE", raising=False)

    def set_(avx512_bf16: bool, amx: bool = False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    return set_


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                                      (False, True, torch.bfloat16)])
def test_auto_follows_the_cpu(cpu_bf16, avx512_bf16, amx, expected):
    cpu_bf16(avx512_bf16, amx)
    assert runtime.auto_dtype("cpu") == expected and runtime.resolve_dtype("auto", "cpu") == expected
    cfg = samvit.EncoderConfig(img_size=32, embed_dim=32, depth=1, num_heads=2, window_size=0,
                               global_attn_indexes=(0,), out_chans=8)
    assert samvit.load_encoder(cfg, dtype="auto").dtype == expected
    assert samvit.load_encoder(cfg).dtype == torch.float32  # the default is float32 on every CPU (opt in to auto)
    assert runtime.cpu_features()["avx512_bf16"] == avx512_bf16 and runtime.cpu_features()["amx"] == amx


def test_explicit_dtype_wins_with_a_warning_when_emulated(cpu_bf16):
    cpu_bf16(False)
    with pytest.warns(UserWarning, match="emulated"):
        assert runtime.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.warns(UserWarning, match="emulated"):
        assert runtime.resolve_dtype(torch.bfloat16) == torch.bfloat16
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.resolve_dtype("bf16", "cpu") == torch.bfloat16
        assert runtime.resolve_dtype("float32", "cpu") == torch.float32 and runtime.resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        runtime.resolve_dtype("int8")


def test_cuda_and_the_environment(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert runtime.auto_dtype("cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setenv("SAMVIT_DTYPE", "float32")
    assert runtime.auto_dtype("cpu") == torch.float32


def test_info_device_prints_the_detection(cpu_bf16, capsys):
    from samvit.cli import main

    cpu_bf16(False)
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "avx512_bf16 no" in out and "--dtype auto -> float32" in out
    cpu_bf16(True)
    assert main(["info", "--device", "cpu"]) == 0
    assert "avx512_bf16 yes" in capsys.readouterr().out
