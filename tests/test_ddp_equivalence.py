"""Two gloo processes with half of every global batch train exactly like one process with the whole batch.

The real Trainer in each process (DDP, rank slices of one global order); a model without batch
statistics (``small_cnn`` with ``norm: none``) so that "exactly" is meaningful. After two epochs the
parameters match to float tolerance, and the losses' statistics (Softmax-EQL, GALA, Seesaw), the
diagnostics observer and GBG's min-norm weights are identical across ranks and equal to the
single-process values.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradtail.config import config_from_dict
from gradtail.engine.trainer import Trainer

BASE = {
    "name": "ddp_eq",
    "data": {
        "dataset": "synthetic",
        "imbalance_factor": 4,
        "val_per_class": 0,
        "synthetic": {"num_classes": 4, "per_class": 40, "test_per_class": 5, "image_size": 8, "noise": 0.3},
        "augment": {"crop_padding": 0, "hflip": False},
    },
    "model": {"name": "small_cnn", "params": {"width": 4, "norm": "none"}},
    "optim": {"lr": 0.05, "batch_size": 16, "epochs": 2, "warmup_epochs": 0, "schedule": "cosine",
              "drop_last": True},
    "train": {"progress": False, "seed": 3, "amp": "none"},  # exact equality: float32 on every machine
}  # fmt: skip


def _config(method: str, batch_size: int):
    cfg = copy.deepcopy(BASE)
    if method.startswith("gbg"):  # GBG over CE: 4 classes in 2 spectral groups, grouped at init
        combiner = method.split("_")[1]
        cfg["loss"] = {"name": "ce"}
        cfg["update_rule"] = {"name": "gbg", "params": {"num_groups": 2, "combiner": combiner}}
    else:
        cfg["loss"] = {"name": method}
    cfg["optim"]["batch_size"] = batch_size
    return config_from_dict(cfg)


def _state(trainer: Trainer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "loss": {
            k: v.clone() for k, v in trainer.loss_fn.state_dict().items() if isinstance(v, torch.Tensor)
        },
        "diag": trainer.diagnostics.stats.pos.clone(),
        "alpha": getattr(trainer.update_rule, "last_alpha", None),
    }


def _worker(rank: int, tmp: str, loss: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        trainer = Trainer(_config(loss, 8), output_dir=f"{tmp}/two", verbose=False)
        trainer.fit()
        torch.save(_state(trainer), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("loss", ["softmax_eql", "gala", "seesaw", "gbg_mgda", "gbg_sum"])
def test_two_processes_equal_one_process(tmp_path, loss):
    mp.spawn(_worker, args=(str(tmp_path), loss), nprocs=2, join=True)
    one = Trainer(_config(loss, 16), output_dir=tmp_path / "one", verbose=False)
    one.fit()
    want = _state(one)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for k, v in want["params"].items():
        torch.testing.assert_close(
            got[0]["params"][k], got[1]["params"][k], rtol=0, atol=0
        )  # DDP keeps ranks equal
        torch.testing.assert_close(got[0]["params"][k], v, rtol=1e-5, atol=1e-6)
    if loss.startswith("gbg"):  # the min-norm weights of the last step, over the global batch
        assert want["alpha"] is not None and want["alpha"].numel() == 2
        torch.testing.assert_close(got[0]["alpha"], got[1]["alpha"], rtol=0, atol=0)
        torch.testing.assert_close(got[0]["alpha"].float(), want["alpha"].float(), rtol=1e-4, atol=1e-5)
    else:
        assert want["loss"], f"{loss} keeps statistics buffers"
    for k, v in want["loss"].items():
        torch.testing.assert_close(got[0]["loss"][k], got[1]["loss"][k], rtol=0, atol=0)
        torch.testing.assert_close(got[0]["loss"][k], v, rtol=1e-6, atol=1e-9)  # float32 logits
    torch.testing.assert_close(got[0]["diag"], got[1]["diag"], rtol=0, atol=0)
    torch.testing.assert_close(got[0]["diag"], want["diag"], rtol=1e-6, atol=1e-9)
