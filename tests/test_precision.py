"""``train.amp: auto`` (issue 18): bfloat16 autocast where the device computes it natively, float32
elsewhere; the resolved choice is recorded; statistics stay exact under bf16."""

from __future__ import annotations

import json

import pytest
import torch

from gradtail.config import config_from_dict
from gradtail.engine.trainer import Trainer
from gradtail.environment import native_bf16, resolve_amp
from gradtail.errors import ConfigError
from gradtail.losses import create_loss


def _cpu_features(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


FEATURES = [(False, False, "none"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")]


@pytest.mark.parametrize(("avx512_bf16", "amx", "want"), FEATURES)
def test_auto_on_cpu_follows_the_native_bf16_instructions(monkeypatch, avx512_bf16, amx, want):
    _cpu_features(monkeypatch, avx512_bf16, amx)
    p = resolve_amp("auto", torch.device("cpu"))
    assert p.resolved == want
    assert p.dtype == (torch.bfloat16 if want == "bf16" else None)
    if want == "bf16":
        assert ("AVX512-BF16" in p.reason) == avx512_bf16 and ("AMX" in p.reason) == amx
    else:
        assert p.reason == "CPU without AVX512-BF16 or AMX"
    assert p.describe().startswith("bfloat16 autocast (auto: CPU with" if want == "bf16" else "float32 (auto")


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    for supported, want in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_amp("auto", torch.device("cuda")).resolved == want
        assert native_bf16(torch.device("cuda"))[0] is supported


def test_explicit_settings_are_kept_and_fp16_needs_cuda(monkeypatch):
    _cpu_features(monkeypatch, False, False)
    assert resolve_amp("bf16", torch.device("cpu")).resolved == "bf16"  # forced, even if emulated
    assert resolve_amp("none", torch.device("cpu")).dtype is None
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train\.amp must be one of auto, none, bf16, fp16"):
        config_from_dict({"train": {"amp": "float16"}})
    assert config_from_dict({}).train.amp == "auto"


def _tiny(tmp_path, amp: str):
    cfg = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "imbalance_factor": 4,
                "val_per_class": 3,
                "synthetic": {"num_classes": 3, "per_class": 20, "test_per_class": 5, "image_size": 10},
            },
            "model": {"name": "small_cnn", "params": {"width": 4}},
            "loss": {"name": "softmax_eql"},
            "optim": {"batch_size": 16, "epochs": 1, "warmup_epochs": 0, "schedule": "constant", "lr": 0.01},
            "train": {"progress": False, "amp": amp},
        }
    )
    return Trainer(cfg, output_dir=tmp_path, verbose=False)


@pytest.mark.parametrize("native", [False, True])
def test_the_trainer_uses_and_records_the_resolved_precision(tmp_path, monkeypatch, native):
    _cpu_features(monkeypatch, native, False)
    trainer = _tiny(tmp_path, "auto")
    assert trainer.autocast_dtype == (torch.bfloat16 if native else None)
    final = trainer.fit()
    want = {"setting": "auto", "resolved": "bf16" if native else "none", "reason": trainer.precision.reason}
    assert final["amp"] == want
    assert json.loads((tmp_path / "environment.json").read_text())["amp"] == want
    x, _ = next(iter(trainer.data.eval_loader("test", trainer.cfg, trainer.device)))
    with trainer.autocast():
        z = trainer.model(x)
    assert z.dtype == (torch.bfloat16 if native else torch.float32)


STATEFUL = ("softmax_eql", "sigmoid_eql", "efl", "eqfl", "gala", "seesaw")


@pytest.mark.parametrize("name", STATEFUL)
def test_statistics_under_bf16_equal_float32_statistics_of_the_same_logits(name):
    """A bf16 model produces bf16 logits; the loss upcasts them, so the statistics equal those a float32
    run accumulates from the same logit values (bit for bit), over several steps."""
    torch.manual_seed(0)
    counts = [50, 20, 8, 3]
    losses = {dtype: create_loss(name, 4, class_counts=counts).train() for dtype in ("bf16", "f32")}
    for _ in range(3):
        z16 = torch.randn(12, 4).to(torch.bfloat16).requires_grad_()
        z32 = z16.detach().float().requires_grad_()  # the same values, in float32
        y = torch.randint(0, 4, (12,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16 = losses["bf16"](z16, y)
        l32 = losses["f32"](z32, y)
        l16.backward()
        l32.backward()
        torch.testing.assert_close(l16.float(), l32, rtol=0, atol=0)
    state16, state32 = losses["bf16"].state_dict(), losses["f32"].state_dict()
    assert state16.keys() == state32.keys() and state16
    for key in state16:
        assert torch.equal(state16[key], state32[key]), key
