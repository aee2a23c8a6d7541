"""GALA loss (gala.md §1-2, §5; issue 5): value, gradient, statistics, timing, checkpointing."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtail.errors import ConfigError, InputError
from gradtail.losses import create_loss, loss_names
from gradtail.losses.gala import GALALoss

C = 5


def make_batches(seed: int, steps: int, num_classes: int = C, dtype: torch.dtype = torch.float64) -> list:
    """Random (logits, targets) batches of varying size, including a batch of one sample and a class
    (the last one) that never appears in the first steps."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        n = 1 if t == 2 else int(torch.randint(3, 9, (1,), generator=gen))
        hi = num_classes - 1 if t < 3 else num_classes
        z = 2.0 * torch.randn(n, num_classes, generator=gen, dtype=dtype)
        y = torch.randint(0, hi, (n,), generator=gen)
        out.append((z, y))
    return out


def run_steps(loss: GALALoss, batches: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training steps through ``loss``: (loss value, dL/dz) per step."""
    results = []
    for z, y in batches:
        z = z.clone().requires_grad_(True)
        value = loss(z, y)
        value.backward()
        results.append((value.detach(), z.grad.detach()))
    return results


def reference_run(
    batches: list,
    variant: str,
    accumulation: str,
    lambda1: float,
    lambda2: float,
    eps: float = 1e-3,
    record: list | None = None,
) -> list[tuple[float, np.ndarray]]:
    """Independent float64 loop over gala.md §1-2, with the *literal* formulas (the ``code`` variant keeps
    its -lambda2 log(phi_k + eps) term on every logit). Empty statistics give zero offsets (step 1 = CE).

    The statistics are the C x C matrix M[j, c] of gala.md §1; ``record`` (a list) receives, after each
    step, (M, theta2, phi2) as copies."""
    num_classes = batches[0][0].shape[1]
    m = np.zeros((num_classes, num_classes))  # M[j, c]
    theta2 = np.zeros(num_classes)
    phi2 = np.zeros(num_classes)
    out = []
    for step, (zt, yt) in enumerate(batches):
        z = zt.double().numpy()
        y = yt.numpy()
        b = z.shape[0]
        if accumulation == "single":
            theta = np.array([m[j, j] for j in range(num_classes)])
            phi = np.array([sum(m[j, c] for j in range(num_classes) if j != c) for c in range(num_classes)])
        else:
            theta, phi = theta2.copy(), phi2.copy()
        adj = z.copy()
        if step > 0:
            for i in range(b):
                k = y[i]
                for j in range(num_classes):
                    if variant == "paper" and j == k:
                        continue
                    adj[i, j] += lambda1 * math.log(theta[j] + eps) - lambda2 * math.log(phi[k] + eps)
        total = 0.0
        grad = np.zeros_like(z)
        for i in range(b):
            mx = adj[i].max()
            lse = mx + math.log(sum(math.exp(v - mx) for v in adj[i]))
            total += lse - adj[i, y[i]]
            for j in range(num_classes):
                p = math.exp(adj[i, j] - lse)
                grad[i, j] = (p - (1.0 if j == y[i] else 0.0)) / b
        for i in range(b):
            for j in range(num_classes):
                m[j, y[i]] += abs(grad[i, j])
        if accumulation == "double":
            theta2 += np.diag(m)
            phi2 += m.sum(axis=0) - np.diag(m)
        if record is not None:
            record.append((m.copy(), theta2.copy(), phi2.copy()))
        out.append((total / b, grad))
    return out


# ---------------------------------------------------------------------------------------------- basics
def test_registered_with_defaults() -> None:
    assert "gala" in loss_names()
    loss = create_loss("gala", C, class_counts=[5, 4, 3, 2, 1])
    assert isinstance(loss, GALALoss)
    assert (loss.variant, loss.accumulation) == ("paper", "single")
    assert (loss.lambda1, loss.lambda2, loss.eps) == (1.0, 1.0, 1e-3)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("accumulation", ["single", "double"])
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (1.2, 0.9)])
def test_step_one_is_plain_ce(variant: str, accumulation: str, lambdas: tuple[float, float]) -> None:
    """gala.md §2: all statistics 0 -> plain CE, exactly (paper with lambda1 != lambda2 included: empty
    statistics are zero offsets, not (lambda1 - lambda2) log(eps) on the non-target logits)."""
    loss = GALALoss(C, variant=variant, accumulation=accumulation, lambda1=lambdas[0], lambda2=lambdas[1])
    z = torch.randn(7, C, requires_grad=True)
    y = torch.randint(0, C, (7,))
    value = loss(z, y)
    (g,) = torch.autograd.grad(value, z)
    z2 = z.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(z2, y)
    (g_ce,) = torch.autograd.grad(ce, z2)
    assert torch.equal(value, ce)
    assert torch.equal(g, g_ce)
    assert int(loss.stats.steps) == 1


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("accumulation", ["single", "double"])
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (1.2, 0.9)])
def test_value_and_gradient_match_reference(
    variant: str, accumulation: str, lambdas: tuple[float, float]
) -> None:
    batches = make_batches(seed=3, steps=8)
    loss = GALALoss(C, variant=variant, accumulation=accumulation, lambda1=lambdas[0], lambda2=lambdas[1])
    got = run_steps(loss, batches)
    want = reference_run(batches, variant, accumulation, *lambdas)
    for (value, grad), (ref_value, ref_grad) in zip(got, want, strict=True):
        assert value.item() == pytest.approx(ref_value, rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)
    # statistics evolved and moved the loss away from CE
    assert not torch.allclose(got[-1][0], F.cross_entropy(*batches[-1]))


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("accumulation", ["single", "double"])
@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (1.2, 0.9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vector_statistics_equal_the_matrix_reading(
    variant: str, accumulation: str, lambdas: tuple[float, float], dtype: torch.dtype
) -> None:
    """Issue #29: the two vectors kept instead of the C x C matrix read what the matrix would hold, after
    every step: theta = diag(M), phi = off-diagonal column sums, N = off-diagonal row sums (``single``),
    and the second level of ``double``. The matrix is the test's own float64 reference loop."""
    batches = make_batches(seed=31, steps=9, dtype=dtype)
    loss = GALALoss(C, variant=variant, accumulation=accumulation, lambda1=lambdas[0], lambda2=lambdas[1])
    record: list = []
    reference_run(batches, variant, accumulation, *lambdas, record=record)
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    for (z, y), (m, theta2, phi2) in zip(batches, record, strict=True):
        loss(z.clone().requires_grad_(True), y).backward()
        diag = np.diag(m)
        reading = {
            "pos": diag,
            "produced": m.sum(axis=0) - diag,  # sum_{j != c} M[j, c]
            "neg": m.sum(axis=1) - diag,  # sum_{c != j} M[j, c]: the negative gradient received by j
        }
        for name, want in reading.items():
            np.testing.assert_allclose(getattr(loss.stats, name).numpy(), want, rtol=rtol, atol=1e-14)
        single = accumulation == "single"
        np.testing.assert_allclose(loss.theta().numpy(), diag if single else theta2, rtol=rtol, atol=1e-14)
        want_phi = reading["produced"] if single else phi2
        np.testing.assert_allclose(loss.phi().numpy(), want_phi, rtol=rtol, atol=1e-14)
    assert int(loss.stats.steps) == len(batches)
    state_floats = sum(b.numel() for b in loss.buffers() if b.is_floating_point())
    assert state_floats == (3 if accumulation == "single" else 5) * C  # vectors only, no C x C matrix


def test_a_checkpoint_with_the_matrix_loads_as_the_two_vectors() -> None:
    """A checkpoint written before issue #29 holds ``stats.matrix``: loading it gives phi = its
    off-diagonal column sums, and training continues as from the vectors."""
    batches = make_batches(seed=41, steps=8)
    trained = GALALoss(C, lambda1=1.2, lambda2=0.9)
    run_steps(trained, batches[:5])
    record: list = []
    reference_run(batches[:5], "paper", "single", 1.2, 0.9, record=record)
    old_state = {k: v.clone() for k, v in trained.state_dict().items() if k != "stats.produced"}
    old_state["stats.matrix"] = torch.tensor(record[-1][0])  # the C x C matrix the old version kept
    resumed = GALALoss(C, lambda1=1.2, lambda2=0.9)
    resumed.load_state_dict(old_state)
    torch.testing.assert_close(resumed.phi(), trained.phi(), rtol=1e-10, atol=1e-14)
    assert "stats.matrix" not in resumed.state_dict()
    for (va, ga), (vb, gb) in zip(
        run_steps(trained, batches[5:]), run_steps(resumed, batches[5:]), strict=True
    ):
        torch.testing.assert_close(vb, va, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)


def test_code_variant_ignores_lambda2() -> None:
    """gala.md §5: in ``code`` the loss and its gradients do not change with lambda2."""
    batches = make_batches(seed=5, steps=6, dtype=torch.float32)
    for accumulation in ("single", "double"):
        a = run_steps(GALALoss(C, variant="code", accumulation=accumulation, lambda2=0.1), batches)
        b = run_steps(GALALoss(C, variant="code", accumulation=accumulation, lambda2=3.0), batches)
        for (va, ga), (vb, gb) in zip(a, b, strict=True):
            assert torch.equal(va, vb)
            assert torch.equal(ga, gb)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("accumulation", ["single", "double"])
def test_phi_equals_theta_after_many_steps(variant: str, accumulation: str) -> None:
    """gala.md §1: for softmax CE phi_c == theta_c at every step."""
    loss = GALALoss(C, variant=variant, accumulation=accumulation, lambda1=1.2, lambda2=0.9)
    gen = torch.Generator().manual_seed(11)
    for _ in range(30):
        z = 3.0 * torch.randn(16, C, generator=gen)
        y = torch.randint(0, C, (16,), generator=gen)
        loss(z.requires_grad_(True), y).backward()
        torch.testing.assert_close(loss.phi(), loss.theta(), rtol=1e-12, atol=1e-14)
    assert bool((loss.theta() > 0).all())


def test_paper_equals_code_when_lambdas_equal() -> None:
    """gala.md §5: lambda1 == lambda2 -> identical losses, also once the statistics are non-zero."""
    batches = make_batches(seed=7, steps=10)
    for accumulation in ("single", "double"):
        paper = GALALoss(C, variant="paper", accumulation=accumulation, lambda1=1.3, lambda2=1.3)
        code = GALALoss(C, variant="code", accumulation=accumulation, lambda1=1.3, lambda2=1.3)
        rp, rc = run_steps(paper, batches), run_steps(code, batches)
        for (vp, gp), (vc, gc) in zip(rp, rc, strict=True):
            torch.testing.assert_close(vp, vc, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(gp, gc, rtol=1e-9, atol=1e-12)
        assert bool((paper.theta() > 0).all())
        torch.testing.assert_close(paper.theta(), code.theta(), rtol=1e-10, atol=1e-14)


def test_double_accumulation_reproduces_hand_loop() -> None:
    """``double``: after each step the running sums (theta = ``stats.pos``, phi = ``stats.produced``)
    are added again into the second level."""
    batches = make_batches(seed=13, steps=7)
    loss = GALALoss(C, accumulation="double")
    theta2 = torch.zeros(C, dtype=torch.float64)
    phi2 = torch.zeros(C, dtype=torch.float64)
    per_step_sums = []
    for z, y in batches:
        before = torch.stack([loss.stats.pos, loss.stats.produced]).clone()
        loss(z.clone().requires_grad_(True), y).backward()
        now = torch.stack([loss.stats.pos, loss.stats.produced])
        per_step_sums.append(now - before)
        theta2 += now[0]
        phi2 += now[1]
        assert torch.equal(loss.theta(), theta2)
        assert torch.equal(loss.phi(), phi2)
    # closed form: after t steps the second level holds sum_s (t - s + 1) S_s
    t = len(per_step_sums)
    weighted = sum((t - s) * per_step_sums[s] for s in range(t))
    torch.testing.assert_close(loss.theta(), weighted[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.phi(), weighted[1], rtol=1e-12, atol=1e-14)
    # the first level is the plain running sum (what ``single`` reads)
    first = torch.stack([loss.stats.pos, loss.stats.produced])
    torch.testing.assert_close(first, sum(per_step_sums), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------- timing
def test_updates_only_in_training_with_grad() -> None:
    loss = GALALoss(C)
    z = torch.randn(6, C)
    y = torch.randint(0, C, (6,))
    loss.eval()
    loss(z, y)
    loss.train()
    with torch.no_grad():
        loss(z, y)
    assert loss.stats.is_empty
    loss(z.requires_grad_(True), y)
    assert int(loss.stats.steps) == 1


def test_offsets_use_statistics_through_previous_step_and_are_detached() -> None:
    loss = GALALoss(C, variant="code")
    z1, y1 = torch.randn(8, C), torch.randint(0, C, (8,))
    loss(z1.requires_grad_(True), y1)
    theta_after_1 = loss.theta().clone()
    z2 = torch.randn(8, C, requires_grad=True)
    y2 = torch.randint(0, C, (8,))
    value = loss(z2, y2)
    expected = F.cross_entropy(z2.detach() + torch.log(theta_after_1 + 1e-3).float(), y2)
    torch.testing.assert_close(value.detach(), expected)
    assert not any(b.requires_grad for b in loss.buffers())
    assert not loss.logit_offsets(y2).requires_grad
    assert not any(o is not None and o.requires_grad for o in loss.offsets())
    value.backward()  # the graph reaches only the logits
    assert z2.grad is not None


def test_half_precision_logits_give_float_statistics() -> None:
    """Statistics come from the logits upcast (autocast / bf16 does not change them)."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(9, C, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, C, (9,), generator=gen)
    a, b = GALALoss(C), GALALoss(C)
    value = a(z.clone().requires_grad_(True), y)
    b(z.float().requires_grad_(True), y)
    assert value.dtype == torch.float32
    for name in ("pos", "neg", "produced"):
        assert torch.equal(getattr(a.stats, name), getattr(b.stats, name)), name
        assert getattr(a.stats, name).dtype == torch.float64


# ------------------------------------------------------------------------------------------ checkpoint
@pytest.mark.parametrize("accumulation", ["single", "double"])
def test_state_dict_round_trip_resumes_identically(accumulation: str) -> None:
    batches = make_batches(seed=17, steps=9, dtype=torch.float32)
    original = GALALoss(C, accumulation=accumulation, lambda1=1.2, lambda2=0.9)
    run_steps(original, batches[:5])
    state = {k: v.clone() for k, v in original.state_dict().items()}
    if accumulation == "double":
        assert {"theta2", "phi2"} <= set(state)
    assert {"stats.pos", "stats.neg", "stats.produced", "stats.steps"} <= set(state)
    assert "stats.matrix" not in state  # O(C) state (issue #29)
    resumed = GALALoss(C, accumulation=accumulation, lambda1=1.2, lambda2=0.9)
    resumed.load_state_dict(state)
    for (va, ga), (vb, gb) in zip(
        run_steps(original, batches[5:]), run_steps(resumed, batches[5:]), strict=True
    ):
        assert torch.equal(va, vb)
        assert torch.equal(ga, gb)
    assert torch.equal(original.theta(), resumed.theta())


# ----------------------------------------------------------------------------------- scale dependence
def test_paper_variant_scale_dependence() -> None:
    """Documented: with lambda1 != lambda2 the ``paper`` loss depends on the global scale of the stats;
    with lambda1 == lambda2 only the ratios matter (up to eps, made negligible here)."""
    z = torch.randn(6, C, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    base = torch.rand(C, C, dtype=torch.float64) + 0.5

    def value(lambda1: float, lambda2: float, scale: float) -> float:
        loss = GALALoss(C, lambda1=lambda1, lambda2=lambda2, eps=1e-12)
        m = base * scale  # read as the matrix M[j, c]: theta = diag(M), phi = off-diagonal column sums
        loss.stats.pos.copy_(torch.diagonal(m))
        loss.stats.produced.copy_(m.sum(dim=0) - torch.diagonal(m))
        loss.stats.steps.fill_(1)
        loss.eval()
        return loss(z, y).item()

    assert value(1.0, 1.0, 1.0) == pytest.approx(value(1.0, 1.0, 100.0), rel=1e-9)
    assert abs(value(1.2, 0.9, 1.0) - value(1.2, 0.9, 100.0)) > 1e-2


# ----------------------------------------------------------------------------------------- bad input
def test_bad_configuration_and_input() -> None:
    with pytest.raises(ConfigError, match="variant"):
        GALALoss(C, variant="paperr")
    with pytest.raises(ConfigError, match="accumulation"):
        GALALoss(C, accumulation="triple")
    with pytest.raises(ConfigError, match="eps"):
        GALALoss(C, eps=0.0)
    with pytest.raises(ConfigError, match="lambda1"):
        GALALoss(C, lambda1=float("nan"))
    loss = GALALoss(C)
    with pytest.raises(InputError):
        loss(torch.randn(4, C + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError):
        loss(torch.randn(4, C), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError):
        loss(torch.randn(4, C), torch.tensor([0, 1, 2, C]))
    empty = loss(torch.randn(0, C), torch.zeros(0, dtype=torch.long))  # convention E: 0, not an error
    assert empty.item() == 0.0
    assert loss.stats.is_empty


# ---------------------------------------------------------------------------------------- two ranks
def _two_rank_worker(rank: int, init_file: str, z: torch.Tensor, y: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss = GALALoss(z.shape[2], accumulation="double", lambda1=1.2, lambda2=0.9)
        half = z.shape[1] // 2
        sl = slice(rank * half, (rank + 1) * half)
        for t in range(z.shape[0]):
            loss(z[t, sl].clone().requires_grad_(True), y[t, sl]).backward()
        torch.save(loss.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_accumulate_the_statistics_of_one(tmp_path) -> None:
    """Issue 5: two ranks with half a batch each hold exactly the statistics of one process."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(21)
    steps, batch = 4, 8
    z = torch.randn(steps, batch, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (steps, batch), generator=gen)
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), z, y, str(tmp_path)), nprocs=2, join=True)
    single = GALALoss(C, accumulation="double", lambda1=1.2, lambda2=0.9)
    for t in range(steps):
        single(z[t].clone().requires_grad_(True), y[t]).backward()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in single.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-15)
