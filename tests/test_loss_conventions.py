"""The loss conventions of ``gradtail.losses.base`` (E empty batch, S statistics, L labels, N normalisers)
for every registered loss, and their documentation (docs/losses.md, the docstring examples).

Normalisers with ignored samples (convention N): ``sigmoid_eql`` and ``softmax_eql`` divide by the number
of non-ignored samples, ``efl`` / ``eqfl`` by the number of positive samples (non-ignored, non-background);
so a batch with an ignored row gives exactly the loss of the batch without it.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import importlib
import inspect
import pkgutil
import re
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradtail.distributed
import gradtail.gradstats
import gradtail.losses
from gradtail.errors import ConfigError, InputError
from gradtail.gradstats import frozen_statistics
from gradtail.losses import LongTailLoss, create_loss, loss_names

C = 4
COUNTS = [40, 12, 5, 2]
STATEFUL = {"sigmoid_eql", "efl", "eqfl", "softmax_eql", "gala", "seesaw"}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "losses.md"


# ------------------------------------------------------------------ helpers
def build(name: str, **kwargs: Any) -> LongTailLoss:
    return create_loss(name, C, COUNTS, **kwargs)


def logits(n: int, channels: int = C, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, channels, generator=gen, dtype=torch.float64)).to(dtype)


def labels(n: int, seed: int = 0, high: int = C) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed + 100))


def train_steps(loss: LongTailLoss, steps: int = 2, channels: int = C) -> None:
    """Training steps on ordinary labels, so statistics are non-trivial before a test's own call."""
    loss.train()
    for s in range(steps):
        z = logits(8, channels, seed=50 + s).requires_grad_()
        loss(z, labels(8, seed=50 + s)).backward()


def bits(loss: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer as raw bytes: equality of these is bit-identity (0.0 vs -0.0 and NaNs included)."""
    return {
        k: v.detach().reshape(-1).contiguous().view(torch.uint8).clone() for k, v in loss.state_dict().items()
    }


def assert_bits_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"buffers changed: {changed}"


@contextlib.contextmanager
def counting_collectives(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count every all-reduce a loss issues (the statistics' and Seesaw's), passing tensors through."""
    calls: list[int] = []

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor.numel())
        return tensor

    with monkeypatch.context() as m:
        m.setattr(gradtail.gradstats, "all_reduce_sum_", fake)
        m.setattr(gradtail.distributed, "all_reduce_sum_", fake)
        yield calls


def stateful_variants() -> list[tuple[str, dict[str, Any]]]:
    out = [(name, {}) for name in sorted(STATEFUL)]
    out.append(("drw", {"base": "seesaw", "drw_epoch": 0}))  # a wrapper keeps the wrapped loss's rule
    out.append(("gala", {"accumulation": "double"}))
    return out


VARIANT_IDS = [
    f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" if kw else n for n, kw in stateful_variants()
]


# ------------------------------------------------------------------ which losses are stateful
@pytest.mark.parametrize("name", loss_names())
def test_stateful_attribute_marks_exactly_the_losses_whose_buffers_change(name: str) -> None:
    loss = build(name)
    before = bits(loss)
    train_steps(loss, steps=1)
    changed = any(not torch.equal(before[k], v) for k, v in bits(loss).items())
    assert changed == (name in STATEFUL)
    assert loss.stateful == changed


# ------------------------------------------------------------------ E: empty batch
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", loss_names())
def test_empty_batch_is_an_attached_zero_and_changes_nothing(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = build(name)
    train_steps(loss)
    reference = copy.deepcopy(loss)
    with torch.no_grad():  # the dtype a non-empty batch gives (no update: no_grad)
        expected_dtype = reference(logits(3, dtype=dtype), labels(3)).dtype
    head = nn.Linear(3, C).to(dtype)
    z = head(torch.zeros(0, 3, dtype=dtype))
    before = bits(loss)
    with counting_collectives(monkeypatch) as calls:
        value = loss(z, torch.zeros(0, dtype=torch.long))
        empty_calls = len(calls)
        copy.deepcopy(reference)(logits(3, dtype=dtype).requires_grad_(), labels(3))
        full_calls = len(calls) - empty_calls
    assert value.dim() == 0 and value.dtype == expected_dtype
    assert torch.isfinite(value) and value.item() == 0.0
    assert value.requires_grad and value.grad_fn is not None  # attached to the logits' graph
    value.backward()
    for p in head.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert_bits_equal(before, bits(loss))  # statistics and the step counter unchanged
    # every rank reaches the same collectives whether its batch is empty or not (no DDP deadlock)
    assert empty_calls == full_calls == (1 if name in STATEFUL else 0)


@pytest.mark.parametrize("name", loss_names())
def test_empty_batch_is_counted_nowhere_on_a_fresh_loss(name: str) -> None:
    loss = build(name)
    before = bits(loss)
    z = torch.zeros(0, C, requires_grad=True)
    loss(z, torch.zeros(0, dtype=torch.long)).backward()
    assert z.grad is not None and z.grad.shape == (0, C)
    assert_bits_equal(before, bits(loss))
    if hasattr(loss, "stats"):
        assert int(loss.stats.steps) == 0  # the next step is still "step 1" (plain base loss)


def test_empty_segmentation_maps_and_all_ignored_batches_are_empty_batches() -> None:
    loss = create_loss("softmax_eql", C, ignore_index=255)
    train_steps(loss)
    before = bits(loss)
    for shape in [(0, C, 3, 3), (2, C, 0, 3)]:
        z = torch.randn(*shape, requires_grad=True)
        value = loss(z, torch.zeros(shape[0], *shape[2:], dtype=torch.long))
        value.backward()
        assert value.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    z = torch.randn(2, C, 2, 2, requires_grad=True)
    value = loss(z, torch.full((2, 2, 2), 255))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    assert_bits_equal(before, bits(loss))


@pytest.mark.parametrize("name", ["sigmoid_eql", "efl", "eqfl", "softmax_eql"])
def test_all_ignored_rows_are_an_empty_batch(name: str) -> None:
    loss = build(name, ignore_index=-1)
    train_steps(loss)
    before = bits(loss)
    z = logits(3, seed=5).requires_grad_()
    value = loss(z, torch.full((3,), -1))
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(z.grad) == 0
    assert_bits_equal(before, bits(loss))


# ------------------------------------------------------------------ S: when statistics change
@pytest.mark.parametrize(("name", "kwargs"), stateful_variants(), ids=VARIANT_IDS)
def test_eval_mode_with_grad_leaves_buffers_bit_identical_and_warns_once(
    name: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = build(name, **kwargs)
    assert loss.stateful
    train_steps(loss)
    loss.eval()
    before = bits(loss)
    with counting_collectives(monkeypatch) as calls:
        z = logits(6, seed=7).requires_grad_()
        with pytest.warns(RuntimeWarning, match="eval mode"):
            loss(z, labels(6, seed=7)).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss(logits(6, seed=8).requires_grad_(), labels(6, seed=8)).backward()  # warned once already
            with torch.no_grad():
                loss(logits(6, seed=9), labels(6, seed=9))  # evaluation under no_grad: silent
    assert calls == []
    assert_bits_equal(before, bits(loss))
    loss.train()  # and training still updates
    loss(logits(6, seed=10).requires_grad_(), labels(6, seed=10)).backward()
    assert any(not torch.equal(before[k], v) for k, v in bits(loss).items())


def _no_grad() -> contextlib.AbstractContextManager[Any]:
    return torch.no_grad()


def _inference() -> contextlib.AbstractContextManager[Any]:
    return torch.inference_mode()


CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "no_grad": _no_grad,
    "inference_mode": _inference,
    "frozen_statistics": frozen_statistics,
}


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize(("name", "kwargs"), stateful_variants(), ids=VARIANT_IDS)
def test_train_mode_without_grad_or_frozen_leaves_buffers_bit_identical(
    name: str, kwargs: dict[str, Any], context: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loss = build(name, **kwargs)
    train_steps(loss)
    loss.train()
    before = bits(loss)
    z = logits(6, seed=11).requires_grad_(context == "frozen_statistics")
    with counting_collectives(monkeypatch) as calls, warnings.catch_warnings():
        warnings.simplefilter("error")  # never the eval-mode warning here
        with CONTEXTS[context]():
            value = loss(z, labels(6, seed=11))
        if z.requires_grad:
            value.backward()
    assert calls == []
    assert_bits_equal(before, bits(loss))


# ------------------------------------------------------------------ L: labels
@pytest.mark.parametrize("name", loss_names())
def test_background_and_ignore_labels_are_input_errors_by_default(name: str) -> None:
    loss = build(name)
    train_steps(loss)
    before = bits(loss)
    for bad in (C, -1, -100, 255):
        y = torch.tensor([0, bad, 1, 2])
        with pytest.raises(InputError, match=re.escape(f"[0, {C})")):
            loss(logits(4, seed=1).requires_grad_(), y)
    assert_bits_equal(before, bits(loss))


def test_with_the_options_other_labels_are_still_errors_naming_the_accepted_set() -> None:
    loss = build("efl", background_label=True, ignore_index=-1)
    for bad in (C + 1, -2):
        with pytest.raises(InputError, match=re.escape(f"[0, {C}) or {C} (background) or -1 (ignored)")):
            loss(logits(3), torch.tensor([0, bad, C]))
    with pytest.raises(InputError, match="background"):
        build("sigmoid_eql", ignore_index=-1)(logits(2), torch.tensor([C, 0]))  # C needs background_label
    with pytest.raises(InputError):
        build("softmax_eql", ignore_index=255)(logits(2), torch.tensor([-100, 0]))


def test_label_options_have_one_name_and_default_everywhere() -> None:
    from gradtail.losses.equalization import (
        EqualizedFocalLoss,
        EqualizedQualityFocalLoss,
        SigmoidEQL,
        SoftmaxEQL,
    )

    for cls in (SigmoidEQL, EqualizedFocalLoss, EqualizedQualityFocalLoss, SoftmaxEQL):
        params = inspect.signature(cls).parameters
        assert params["ignore_index"].default is None, cls
        if cls is not SoftmaxEQL:
            assert params["background_label"].default is False, cls
        for key in ("ignore", "ignore_label", "background", "bg_label"):
            assert key not in params


@pytest.mark.parametrize("name", ["sigmoid_eql", "efl", "eqfl", "softmax_eql"])
def test_label_option_errors(name: str) -> None:
    for valid_class in (0, C - 1):
        with pytest.raises(ConfigError, match="ignore_index"):
            build(name, ignore_index=valid_class)
    for not_an_int in (1.5, True, "x"):
        with pytest.raises(ConfigError, match="ignore_index"):
            build(name, ignore_index=not_an_int)
    if name != "softmax_eql":
        with pytest.raises(ConfigError, match="background"):
            build(name, background_label=True, ignore_index=C)
        with pytest.raises(ConfigError, match="background_label"):
            build(name, background_label=1)
        assert build(name, ignore_index=C).ignore_index == C  # without background, C may be the ignore label


def test_objectness_needs_background_labels() -> None:
    with pytest.raises(ConfigError, match="background_label=True"):
        create_loss("sigmoid_eql", C, objectness=True)
    assert create_loss("sigmoid_eql", C, objectness=True, background_label=True).num_channels == C + 1


# ------------------------------------------------------------------ L: background rows vs NumPy
def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def ref_sigmoid_eql(z: np.ndarray, t: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """eql.md §2 on a target matrix: (1/n) sum_ij w_ij BCE(z_ij, T_ij); an extra channel has r = q = 1."""
    g = pos / (neg + 1e-10)
    r = 1.0 / (1.0 + np.exp(-12.0 * (g - 0.8)))
    q = 1.0 + 4.0 * (1.0 - r)
    extra = z.shape[1] - len(pos)
    r, q = np.concatenate([r, np.ones(extra)]), np.concatenate([q, np.ones(extra)])
    w = np.where(t == 1, q, r)
    return float((w * np_bce(z, t)).sum() / z.shape[0])


def _focusing(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gamma = 2.0 + 8.0 * (1.0 - np.clip(pos / (neg + 1e-10), 0, 1))  # eql.md §3
    return gamma, gamma / 2.0


def ref_efl(z: np.ndarray, t: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """eql.md §3: sum -alpha_t omega_j (1 - p_t)^gamma_j log p_t over elements, / #positive rows (>= 1)."""
    gamma, omega = _focusing(pos, neg)
    p = np_sigmoid(z)
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, 0.25, 0.75)
    return float((-at * omega * (1 - pt) ** gamma * np.log(pt)).sum() / max(t.sum(), 1))


def ref_eqfl(z: np.ndarray, t: np.ndarray, pos: np.ndarray, neg: np.ndarray, quality: np.ndarray) -> float:
    """eql.md §3 EQFL: omega_j BCE(z, Q) |Q - p|^gamma_j, Q = T * quality, / #positive rows (>= 1)."""
    gamma, omega = _focusing(pos, neg)
    p = np_sigmoid(z)
    soft = t * quality[:, None]
    bce = -(soft * np.log(p) + (1 - soft) * np.log(1 - p))
    return float((omega * bce * np.abs(soft - p) ** gamma).sum() / max(t.sum(), 1))


def fd_grad(f: Callable[[np.ndarray], float], z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


BG_CASES = {
    "sigmoid_eql": ("sigmoid_eql", {}, C),
    "sigmoid_eql_objectness": ("sigmoid_eql", {"objectness": True}, C + 1),
    "efl": ("efl", {}, C),
    "eqfl": ("eqfl", {}, C),
}


@pytest.mark.parametrize("case", sorted(BG_CASES))
def test_background_row_is_the_formula_with_an_all_zero_target(case: str) -> None:
    name, kwargs, channels = BG_CASES[case]
    loss = create_loss(name, C, background_label=True, **kwargs)
    rng = np.random.default_rng(4)
    pos, neg = rng.uniform(0.01, 1.0, C), rng.uniform(0.2, 1.5, C)
    loss.stats.pos.copy_(torch.tensor(pos))
    loss.stats.neg.copy_(torch.tensor(neg))
    loss.stats.steps.fill_(3)
    y = np.array([0, C, 2, C, 1])
    t = np.zeros((5, channels))  # the target matrix, written out independently of the loss
    for i, label in enumerate(y):
        if label < C:
            t[i, label] = 1.0
        elif channels == C + 1:
            t[i, C] = 1.0  # EQLv2 head: the background sample's 1 is on the objectness channel (eql.md §2)
    quality = rng.uniform(0.2, 1.0, 5)
    refs: dict[str, Callable[[np.ndarray], float]] = {
        "sigmoid_eql": lambda zz: ref_sigmoid_eql(zz, t, pos, neg),
        "efl": lambda zz: ref_efl(zz, t, pos, neg),
        "eqfl": lambda zz: ref_eqfl(zz, t, pos, neg, quality),
    }
    f = refs[name]
    z_np = rng.normal(scale=1.5, size=(5, channels))
    z = torch.tensor(z_np, requires_grad=True)
    extra = (torch.tensor(quality),) if name == "eqfl" else ()
    value = loss(z, torch.tensor(y), *extra)
    (grad,) = torch.autograd.grad(value, z)
    assert value.item() == pytest.approx(f(z_np), rel=1e-12)
    np.testing.assert_allclose(grad.numpy(), fd_grad(f, z_np), rtol=1e-6, atol=1e-8)
    # statistics: a background row adds negatives only; the objectness channel is not tracked; EQLv2's
    # official accumulation adds |dL/dz| without the loss's 1/n (eql.md §9), i.e. n times the gradient
    a = grad[:, :C].abs().numpy() * (len(y) if name == "sigmoid_eql" else 1)
    tc = t[:, :C]
    np.testing.assert_allclose(loss.stats.pos.numpy() - pos, (a * tc).sum(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(loss.stats.neg.numpy() - neg, (a * (1 - tc)).sum(0), rtol=1e-10, atol=1e-14)
    assert int(loss.stats.steps) == 4


# ------------------------------------------------------------------ L: an ignored row changes nothing
IGNORE_CASES = {
    "sigmoid_eql": ("sigmoid_eql", {"background_label": True, "ignore_index": -1}, C),
    "sigmoid_eql_objectness": (
        "sigmoid_eql",
        {"objectness": True, "background_label": True, "ignore_index": -1},
        C + 1,
    ),
    "efl": ("efl", {"background_label": True, "ignore_index": -1}, C),
    "eqfl": ("eqfl", {"background_label": True, "ignore_index": -1}, C),
    "softmax_eql": ("softmax_eql", {"ignore_index": 255}, C),
}


@pytest.mark.parametrize("case", sorted(IGNORE_CASES))
def test_an_ignored_row_changes_nothing(case: str) -> None:
    name, kwargs, channels = IGNORE_CASES[case]
    ignore = kwargs["ignore_index"]
    with_row = create_loss(name, C, **kwargs)
    train_steps(with_row, channels=channels)
    without_row = copy.deepcopy(with_row)
    z_base = logits(5, channels, seed=21)
    y_base = torch.tensor([0, C if "background_label" in kwargs else 3, 2, 1, 2])
    q_base = torch.rand(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    at = 2
    z_full = torch.cat([z_base[:at], torch.full((1, channels), 30.0), z_base[at:]])
    y_full = torch.cat([y_base[:at], torch.tensor([ignore]), y_base[at:]])
    q_full = torch.cat([q_base[:at], torch.tensor([0.5], dtype=torch.float64), q_base[at:]])

    def run(
        loss: LongTailLoss, z: torch.Tensor, y: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        z = z.clone().requires_grad_()
        value = loss(z, y, q) if name == "eqfl" else loss(z, y)
        value.backward()
        assert z.grad is not None
        return value.detach(), z.grad

    v_full, g_full = run(with_row, z_full, y_full, q_full)
    v_base, g_base = run(without_row, z_base, y_base, q_base)
    torch.testing.assert_close(v_full, v_base, rtol=1e-13, atol=0)  # the normaliser ignores the row too
    assert torch.count_nonzero(g_full[at]) == 0
    torch.testing.assert_close(torch.cat([g_full[:at], g_full[at + 1 :]]), g_base, rtol=1e-13, atol=0)
    for key, value in without_row.stats.state_dict().items():
        torch.testing.assert_close(with_row.stats.state_dict()[key], value, rtol=1e-13, atol=0, msg=key)


# ------------------------------------------------------------------ E under DDP: no deadlock
def _ddp_steps(rank: int | None) -> dict[str, torch.Tensor]:
    """Step 1: rank 0 has an empty batch, rank 1 six samples; step 2: empty on every rank.
    ``rank=None``: one process with rank 1's batch."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(STATEFUL):
        loss = build(name)
        z, y = logits(6, seed=31), labels(6, seed=31)
        if rank == 0:
            z, y = z[:0], y[:0]
        loss(z.requires_grad_(), y).backward()
        loss(
            torch.zeros(0, C, dtype=torch.float64, requires_grad=True), torch.zeros(0, dtype=torch.long)
        ).backward()
        out.update({f"{name}.{k}": v.clone() for k, v in loss.state_dict().items()})
    return out


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.save(_ddp_steps(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_an_empty_batch_on_one_rank_neither_deadlocks_nor_splits_the_statistics(tmp_path: Path) -> None:
    context = mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("ranks did not finish: a collective was skipped on the empty rank")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _ddp_steps(None)
    assert set(ranks[0]) == set(single)
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # identical statistics on every rank
        if key.endswith(("steps", "cum_samples")):
            assert torch.equal(ranks[0][key], value), key  # one counted step; the labels of rank 1
        else:  # normalisers summed over ranks (gradstats rule 8): the union is rank 1's batch
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-12, atol=1e-15, msg=key)
    assert int(single["efl.stats.steps"]) == 1 and int(single["gala.stats.steps"]) == 1


# ------------------------------------------------------------------ documentation
def test_docs_table_lists_every_registered_loss_with_its_state() -> None:
    rows = {}
    for line in DOCS.read_text().splitlines():
        m = re.match(r"\| `([a-z_]+)` \| ([^|]+) \|", line)
        if m and m.group(1) not in rows:
            rows[m.group(1)] = m.group(2).strip()
    assert set(rows) == set(loss_names())
    for name, stateful in rows.items():
        assert stateful.startswith("yes") == build(name).stateful, name


def test_conventions_are_written_in_base_and_every_loss_points_there() -> None:
    doc = gradtail.losses.base.__doc__ or ""
    for heading in ("E. Empty batch", "S. Statistics", "L. Labels", "N. Normalisers", "docs/losses.md"):
        assert heading in doc
    for name in loss_names():
        assert "gradtail.losses.base" in (type(build(name)).__doc__ or ""), name


def _loss_modules() -> list[Any]:
    names = [f"gradtail.losses.{m.name}" for m in pkgutil.iter_modules(gradtail.losses.__path__)]
    return [gradtail.losses, *(importlib.import_module(n) for n in sorted(names))]


def test_every_public_loss_class_has_a_passing_example() -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    finder = doctest.DocTestFinder()
    documented: set[str] = set()
    for module in _loss_modules():
        for test in finder.find(module, module.__name__):
            if test.examples:
                documented.add(test.name.rsplit(".", 1)[-1])
                runner.run(test)
    public = {
        obj.__name__
        for module in _loss_modules()
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, LongTailLoss)
        and obj.__module__ == module.__name__
        and not obj.__name__.startswith("_")
    }
    assert {"LongTailLoss", "PerSampleLoss", "SigmoidEQL", "GALALoss", "SeesawLoss"} <= public
    missing = sorted((public | {"create_loss"}) - documented)
    assert not missing, f"no Example in the docstring of {missing}"
    assert runner.failures == 0
