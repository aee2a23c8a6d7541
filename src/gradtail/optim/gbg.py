"""GBG: gradient-balancing grouping, long-tailed learning as multi-objective optimisation
(docs/methods/gbg.md).

Stage 1 (:meth:`GBGRule.on_epoch_start`, docs/methods/gbg.md §1): classes are grouped (spectral clustering of
per-class backbone-gradient prototypes, or the ``frequency`` / ``random`` ablations) at the scheduled epochs.

Stage 2 (:meth:`GBGRule.__call__`, docs/methods/gbg.md §2), per step:

1. one forward through ``ctx.forward`` (observers see the logits once);
2. for each group g present in the batch, L_g = ``ctx.loss_fn`` on the batch rows whose label is in g
   (full C-way logits); the batch is sorted by group once, so one host read (the per-group counts) is the
   only synchronisation of the step;
3. ``mgda``: G_g = ``autograd.grad(L_g, shared, retain_graph=True)`` flattened into one (G', D) buffer on
   the device, the Gram matrix M = G G^T, normalisation applied to M (``loss+``: G_g / (L_g ||G_g||),
   ``l2``: G_g / ||G_g||, ``none``), alpha = :func:`~gradtail.optim.min_norm.min_norm_weights` (M).
   ``sum``: alpha_g = 1 and ``mean``: alpha_g = 1 / G' need no group gradients at all;
4. loss = sum_g alpha_g L_g (alpha detached, raw losses), plus the regularizer when active (e.g. the BCL
   term, docs/methods/gbg.md §2.5): it is computed on the whole batch, added outside the balancing (weight 1),
   and receives the combined GBG loss as its ``loss`` argument; then one ``ctx.backward``.

One group present (or before the first grouping): the step is exactly the plain step,
``ctx.criterion(h, z, y)`` and one backward (alpha = [1], no solver, no group gradients).

Group gradients go through a second application of the (parameter-sharing) classifier to the features,
so hooks that observers put on the logits fire only for the final backward. With a ``GradScaler`` the
group losses are scaled before ``autograd.grad`` (alpha is invariant to a common scale of the gradients).
Under DDP the groups, their losses and gradients are those of the *global* batch (summed over ranks), so
every rank solves the same problem and gets the single-process alpha; one code path serves both
(:meth:`GBGRule.__call__`).

``params`` chooses the shared quantity whose gradients are balanced:

- ``backbone`` (faithful): every backbone parameter (``model.backbone_parameters()``);
- ``last_layer``: the parameters of the last shared layer only: the last backbone module owning a weight
  of dimension >= 2 (conv or linear) and the parameterised modules registered after it (its BatchNorm);
  autograd then stops at that layer, so a group gradient costs a fraction of a backward;
- ``features``: the gradient w.r.t. the batch features h (Sener & Koltun's MGDA-UB bound). Groups own
  disjoint rows of h, so these gradients are orthogonal and MGDA reduces to alpha_g proportional to
  1 / ||G^_g||^2 (with ``loss+``: to L_g^2); the cheapest mode, offered for measurement.

Losses that keep statistics (a :class:`~gradtail.gradstats.GradientStatistics` submodule) are refused at
the first step with a :class:`~gradtail.errors.ConfigError`: GBG calls the loss once per group (and again
for the group gradients), so the statistics would be updated several times per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from gradtail.contracts import StepContext, StepOutput, TrainingView, UpdateRule
from gradtail.distributed import all_reduce_sum_, broadcast_, is_distributed, world_size
from gradtail.errors import ConfigError
from gradtail.gradstats import GradientStatistics
from gradtail.optim import register_update_rule
from gradtail.optim.grouping import (
    SKETCHES,
    backbone_parameters,
    class_gradient_prototypes,
    frequency_groups,
    random_groups,
    spectral_groups,
)
from gradtail.optim.min_norm import min_norm_weights
from gradtail.search_space import Choice, IntRange, SearchSpace

GROUPINGS = ("spectral", "frequency", "random")
NORMALIZATIONS = ("loss+", "l2", "none")
COMBINERS = ("mgda", "sum", "mean")
PARAM_MODES = ("backbone", "last_layer", "features")


def parse_group_at(spec: str) -> tuple[str, int]:
    """Parse ``group_at``: ``"init"``, ``"after:k"`` (k >= 0) or ``"every:N"`` (N >= 1) -> (kind, number).

    ``init``: group at the first epoch start (epoch 0; faithful: the random initial model), never again.
    ``after:k``: group once, at the start of epoch k (after k warm-up epochs; until then every class is in
    one group, i.e. plain steps). ``every:N``: group at the start of epochs 0, N, 2N, ...
    """
    text = str(spec).strip()
    if text == "init":
        return "init", 0
    kind, sep, num = text.partition(":")
    if sep and kind in ("after", "every"):
        try:
            value = int(num)
        except ValueError:
            value = -1
        if value >= (1 if kind == "every" else 0):
            return kind, value
    raise ConfigError(f"group_at must be 'init', 'after:k' (k >= 0) or 'every:N' (N >= 1), got {spec!r}")


def last_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The last shared layer: the last backbone module with a >= 2-D weight and the modules after it."""
    backbone = set(map(id, backbone_parameters(model)))
    owners = [m for m in model.modules() if any(id(p) in backbone for p in m.parameters(recurse=False))]
    start = 0
    for i, m in enumerate(owners):
        weight = dict(m.named_parameters(recurse=False)).get("weight")
        if weight is not None and weight.dim() >= 2:
            start = i
    return [p for m in owners[start:] for p in m.parameters(recurse=False) if id(p) in backbone]


@register_update_rule("gbg")
class GBGRule(UpdateRule):
    """The GBG update rule (docs/methods/gbg.md §1-2); see the module docstring for the step.

    Args:
        num_groups: G, the number of class groups (default 4).
        grouping: ``spectral`` (gradient directions, faithful), ``frequency`` or ``random`` (ablations).
        group_at: when to group; see :func:`parse_group_at`.
        normalization: ``loss+`` (default), ``l2`` or ``none`` (docs/methods/gbg.md §2.3).
        combiner: ``mgda`` (default), ``sum`` or ``mean`` (docs/methods/gbg.md §2, ablation combiners).
        params: ``backbone`` (default), ``last_layer`` or ``features``; see the module docstring.
        sketch_dim: random-projection dimension of the grouping prototypes (``None``: full gradients).
        sketch: ``count`` (sparse CountSketch, O(D) per class; default) or ``gaussian`` (dense JL).
        seed: seed of the sketch and of the ``random`` grouping.
        batch_size: batch size of the grouping pass.
        max_iter, tol: bounds of the min-norm solver (docs/methods/gbg.md §2.4).
        eps: floor of the norms and losses in the normalisation.

    Example:
        >>> import torch
        >>> from gradtail.contracts import StepContext
        >>> from gradtail.models import create_model
        >>> from gradtail.optim import create_update_rule
        >>> _ = torch.manual_seed(0)
        >>> model, gbg = create_model("small_cnn", num_classes=3, width=8), create_update_rule("gbg")
        >>> gbg.set_groups(torch.tensor([0, 1, 1]))  # class 0 alone, classes 1 and 2 together
        >>> ctx = StepContext(model=model, loss_fn=torch.nn.CrossEntropyLoss(), regularizer=None, epoch=0)
        >>> out = gbg(ctx, torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0]))  # alpha_g from MGDA
        >>> out.extras, tuple(gbg.last_alpha.shape), round(float(gbg.last_alpha.sum()), 4)
        ({'groups_present': 2.0}, (2,), 1.0)
    """

    search_space: ClassVar[SearchSpace] = {
        "num_groups": IntRange(2, 8),
        "group_at": Choice(("init", "after:1", "every:4")),
    }

    report_note = (
        "GBG (docs/methods/gbg.md): the BCL term of the released code is the separate `bcl` regularizer; "
        "a run without it balances the base loss alone."
    )

    def __init__(
        self,
        num_groups: int = 4,
        grouping: str = "spectral",
        group_at: str = "init",
        normalization: str = "loss+",
        combiner: str = "mgda",
        params: str = "backbone",
        sketch_dim: int | None = None,
        sketch: str = "count",
        seed: int = 0,
        batch_size: int = 256,
        max_iter: int = 250,
        tol: float = 1e-5,
        eps: float = 1e-12,
    ) -> None:
        if int(num_groups) < 1:
            raise ConfigError(f"gbg: num_groups must be >= 1, got {num_groups}")
        for name, value, valid in (
            ("grouping", grouping, GROUPINGS),
            ("normalization", normalization, NORMALIZATIONS),
            ("combiner", combiner, COMBINERS),
            ("params", params, PARAM_MODES),
            ("sketch", sketch, SKETCHES),
        ):
            if value not in valid:
                raise ConfigError(f"gbg: {name} must be one of {', '.join(valid)}; got {value!r}")
        if sketch_dim is not None and int(sketch_dim) < 1:
            raise ConfigError(f"gbg: sketch_dim must be >= 1 or null, got {sketch_dim}")
        if int(batch_size) < 1 or int(max_iter) < 1 or tol < 0 or eps <= 0:
            raise ConfigError("gbg: batch_size and max_iter must be >= 1, tol >= 0 and eps > 0")
        self.num_groups = int(num_groups)
        self.grouping = grouping
        self.group_at = group_at
        self._schedule = parse_group_at(group_at)
        self.normalization = normalization
        self.combiner = combiner
        self.params = params
        self.sketch_dim = None if sketch_dim is None else int(sketch_dim)
        self.sketch = sketch
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.eps = float(eps)
        self.groups: torch.Tensor | None = None  # (C,) long, on the CPU; checkpointed
        self.grouped_epoch = -1
        self.last_alpha: torch.Tensor | None = None  # weights of the last multi-group step (diagnostics)
        self._device_groups: torch.Tensor | None = None
        self._num_used = 0
        self._checked_loss: int | None = None
        self._shared_cache: tuple[int, list[torch.Tensor]] | None = None
        # this epoch's steps: (group ids present, their weights; None = one group, weight 1), for the summary
        self._alpha_log: list[tuple[list[int], torch.Tensor | None]] = []

    # ------------------------------------------------------------------ stage 1: grouping
    def due(self, epoch: int) -> bool:
        """Whether the schedule groups at the start of ``epoch`` (a resumed run keeps its loaded groups)."""
        kind, n = self._schedule
        if kind == "init":
            return self.groups is None
        if kind == "after":
            return self.groups is None and epoch >= n
        return self.groups is None or (epoch % n == 0 and epoch != self.grouped_epoch)

    def on_epoch_start(self, epoch: int, view: TrainingView) -> None:
        """Group the classes when scheduled (docs/methods/gbg.md §1)."""
        if self.due(epoch):
            self.set_groups(self.compute_groups(view))
            self.grouped_epoch = int(epoch)

    def compute_groups(self, view: TrainingView) -> torch.Tensor:
        """Group ids (C,) by the configured grouping; rank 0's result is broadcast under DDP."""
        num_classes = int(view.num_classes)
        device = next(view.model.parameters()).device
        if self.grouping == "spectral":
            if view.train_images is None:
                raise ConfigError(
                    "GBG's spectral grouping re-reads the un-augmented training images, which only "
                    "in-memory datasets keep; use grouping: frequency or random for image-list datasets"
                )
            prototypes = class_gradient_prototypes(
                view.model,
                view.loss_fn,
                view.train_images,
                view.train_labels,
                num_classes,
                batch_size=self.batch_size,
                sketch_dim=self.sketch_dim,
                sketch=self.sketch,
                seed=self.seed,
                device=device,
                transform=view.normalize,
                params=backbone_parameters(view.model),
            )
            groups = spectral_groups(prototypes, self.num_groups, seed=self.seed)
            del prototypes
        elif self.grouping == "frequency":
            groups = frequency_groups(view.class_counts, self.num_groups)
        else:
            groups = random_groups(num_classes, self.num_groups, seed=self.seed)
        if groups.numel() != num_classes:
            raise ConfigError(f"gbg: grouping gave {groups.numel()} ids for {num_classes} classes")
        if is_distributed():
            groups = broadcast_(groups.to(device), src=0).cpu()
        return groups

    def set_groups(self, groups: torch.Tensor) -> None:
        """Install group ids (C,), contiguous from 0."""
        self.groups = torch.as_tensor(groups, dtype=torch.long).detach().cpu().clone()
        if self.groups.dim() != 1 or (self.groups.numel() and int(self.groups.min()) < 0):
            raise ConfigError("gbg: groups must be a 1-D tensor of non-negative group ids")
        self._num_used = int(self.groups.max()) + 1 if self.groups.numel() else 0
        self._device_groups = None

    @property
    def num_groups_used(self) -> int:
        """The number of distinct group ids (G, or fewer when C < G or a cluster came out empty)."""
        return 0 if self.groups is None else self._num_used

    # ------------------------------------------------------------------ stage 2: the step
    def _check_loss(self, loss_fn: nn.Module) -> None:
        if self._checked_loss == id(loss_fn):
            return
        if any(isinstance(m, GradientStatistics) for m in loss_fn.modules()):
            raise ConfigError(
                f"gbg: the loss {type(loss_fn).__name__} keeps gradient statistics; GBG evaluates the "
                "loss once per group, which would update them several times per step. Use a stateless "
                "base loss (ce, logit-adjusted ce)."
            )
        self._checked_loss = id(loss_fn)

    def _shared(self, model: nn.Module) -> list[torch.Tensor]:
        if self._shared_cache is None or self._shared_cache[0] != id(model):
            if self.params == "last_layer":
                shared: list[torch.Tensor] = list(last_layer_parameters(model))
            else:
                shared = list(backbone_parameters(model))
            self._shared_cache = (id(model), shared)
        return self._shared_cache[1]

    def __call__(self, ctx: StepContext, x: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """One GBG step over the *global* batch: the same code for one process and for DDP.

        Rank r holds S_rg, the sum of its base losses in group g; with N_g the global group size,
        L_g = sum_r S_rg / N_g (one process: S_g / N_g, the group's mean loss). The group counts, the loss
        values and the group gradients of S_rg / N_g are SUM-all-reduced (no-ops without a process group;
        every rank reaches them in the same order), every rank solves the same min-norm problem, and each
        rank backpropagates W * sum_g alpha_g S_rg / N_g, which DDP's gradient mean turns into the
        gradient of sum_g alpha_g L_g. So alpha under DDP equals the single-process alpha for the same
        global batch (tests/test_ddp_equivalence.py).
        """
        self._check_loss(ctx.loss_fn)
        h, z = ctx.forward(x, targets)
        if self.groups is None:
            return self._plain(ctx, h, z, targets)
        if self._device_groups is None or self._device_groups.device != targets.device:
            if self.groups.numel() != z.shape[-1]:
                raise ConfigError(f"gbg: {self.groups.numel()} class groups for a {z.shape[-1]}-class model")
            self._device_groups = self.groups.to(targets.device)
        group_of = self._device_groups[targets]
        local = torch.bincount(group_of, minlength=self.num_groups_used).to(torch.float64)
        both = torch.stack([local, all_reduce_sum_(local.clone())]).tolist()  # the one host read
        local_counts, global_counts = both[0], both[1]
        present = [g for g, n in enumerate(global_counts) if n > 0]
        if len(present) <= 1:
            self._alpha_log.append((present, None))
            return self._plain(ctx, h, z, targets)

        sizes = [int(local_counts[g]) for g in present]  # rows of this rank per present group
        ratios = [local_counts[g] / global_counts[g] for g in present]  # n_rg / N_g (1 in one process)
        order = torch.argsort(group_of, stable=True)
        y_parts = targets[order].split(sizes)

        def group_terms(logits: torch.Tensor) -> list[torch.Tensor | None]:
            """S_rg / N_g per present group (None where this rank has no row of the group)."""
            terms: list[torch.Tensor | None] = []
            with ctx.autocast():
                for zp, yp, ratio in zip(logits[order].split(sizes), y_parts, ratios, strict=True):
                    terms.append(None if yp.numel() == 0 else ctx.loss_fn(zp, yp) * ratio)
            return terms

        terms = group_terms(z)
        dtype = torch.promote_types(h.dtype, torch.float32)
        values = torch.stack(
            [z.new_zeros((), dtype=dtype) if t is None else t.detach().to(dtype) for t in terms]
        )
        loss_values = all_reduce_sum_(values)  # L_g, identical on every rank
        group_grads = None
        if self.combiner == "sum":
            alpha = torch.ones_like(loss_values)
        elif self.combiner == "mean":
            alpha = torch.full_like(loss_values, 1.0 / len(present))
        else:
            group_grads = self._group_gradients(ctx, h, group_terms)
            alpha = self._solve(group_grads, loss_values)
        alpha = alpha.detach()
        self.last_alpha = alpha
        self._alpha_log.append((present, alpha))
        world = world_size()
        local_total = sum(
            (float(world) * a.to(t.dtype) * t for a, t in zip(alpha, terms, strict=True) if t is not None),
            z.new_zeros((), dtype=torch.float32),
        )
        term = ctx.regularize(h, z, targets, local_total)
        if term is not None:
            local_total = local_total + term
        if group_grads is not None and self.params == "backbone" and term is None and world == 1:
            self._backward_reusing_group_gradients(ctx, local_total, alpha, group_grads)
        else:
            ctx.backward(local_total)
        total = (alpha * loss_values).sum() + (0.0 if term is None else term.detach())
        return StepOutput(
            loss=total.detach(), logits=z.detach(), extras={"groups_present": float(len(present))}
        )

    def _backward_reusing_group_gradients(
        self, ctx: StepContext, total: torch.Tensor, alpha: torch.Tensor, group_grads: torch.Tensor
    ) -> None:
        """The final backward without a second pass through the backbone (one process only).

        The backbone gradient of sum_g alpha_g L_g is sum_g alpha_g G_g, and the G_g (raw, scaled like
        the loss under fp16) are already computed for the Gram matrix; only the head needs a backward,
        which autograd restricts to the classifier (and the observers' hooks on the logits fire in it).
        Used when the shared parameters are the whole backbone and no regularizer or DDP reduction needs
        the ordinary backward.
        """
        model = ctx.network
        combined = alpha.to(group_grads.dtype) @ group_grads
        offset = 0
        for p in self._shared(model):
            g = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = g if p.grad is None else p.grad + g
        head = [p for p in model.classifier.parameters() if p.requires_grad]
        scaled = ctx.scaler.scale(total) if ctx.scaler is not None else total
        for p, g in zip(head, torch.autograd.grad(scaled, head), strict=True):
            p.grad = g if p.grad is None else p.grad + g

    def _group_gradients(
        self,
        ctx: StepContext,
        h: torch.Tensor,
        group_terms: Callable[[torch.Tensor], list[torch.Tensor | None]],
    ) -> torch.Tensor:
        """G_g (k, D): the gradients of the group losses w.r.t. the shared quantity, summed over ranks.

        The group terms go through a second, hook-free application of the classifier to the features, so
        hooks that observers put on the logits fire only for the final backward. Under fp16 the terms are
        scaled like the loss (alpha is invariant to a common scale of the gradients).
        """
        model = ctx.network
        shared: list[torch.Tensor] = [h] if self.params == "features" else self._shared(model)
        with ctx.autocast():
            terms = group_terms(model.classifier(h))
        dim = sum(t.numel() for t in shared)
        dtype = torch.promote_types(shared[0].dtype, torch.float32)
        flat = torch.zeros(len(terms), dim, device=h.device, dtype=dtype)
        for i, term in enumerate(terms):
            if term is None:
                continue
            scaled = ctx.scaler.scale(term) if ctx.scaler is not None else term
            grads = torch.autograd.grad(
                scaled, shared, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            torch.cat([g.reshape(-1).to(dtype) for g in grads], out=flat[i])
        return all_reduce_sum_(flat)

    def epoch_summary(self) -> dict[str, float]:
        """``alpha_group{g}``: the mean over the epoch's grouped steps of group g's weight (0 in steps where
        g is absent; a one-group step gives its group 1), then reset. Empty before the first grouping.

        The steps only keep references to their (detached, device) weights; they are read here, in one
        host transfer per epoch, so the training step gains no synchronisation.
        """
        if not self._alpha_log:
            return {}
        weights = [a.reshape(-1) for _, a in self._alpha_log if a is not None]
        values = iter(torch.cat(weights).double().tolist() if weights else [])
        sums = [0.0] * self.num_groups_used
        for present, alpha in self._alpha_log:
            for g in present:
                sums[g] += 1.0 if alpha is None else next(values)
        steps = len(self._alpha_log)
        self._alpha_log = []
        return {f"alpha_group{g}": v / steps for g, v in enumerate(sums)}

    def _plain(self, ctx: StepContext, h: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """One group (or none yet): alpha = [1], the plain base-loss step (docs/methods/gbg.md §5: never
        crash)."""
        loss = ctx.criterion(h, z, y)
        ctx.backward(loss)
        self.last_alpha = torch.ones(1, device=z.device)
        return StepOutput(loss=loss.detach(), logits=z.detach(), extras={"groups_present": 1.0})

    def _solve(self, flat: torch.Tensor, loss_values: torch.Tensor) -> torch.Tensor:
        """Min-norm weights of the normalised group gradients (docs/methods/gbg.md §2.3-2.4) from their Gram
        matrix."""
        gram = flat @ flat.T
        if self.normalization == "none":
            scale = torch.ones(flat.shape[0], device=gram.device, dtype=gram.dtype)
        else:
            scale = 1.0 / torch.diagonal(gram).clamp_min(0.0).sqrt().clamp_min(self.eps)
            if self.normalization == "loss+":
                scale = scale / loss_values.to(gram.dtype).clamp_min(self.eps)
        gram = gram * scale[:, None] * scale[None, :]
        return min_norm_weights(gram, max_iter=self.max_iter, tol=self.tol)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The groups (a CPU LongTensor, or None before the first grouping) and the epoch they were made."""
        return {
            "groups": None if self.groups is None else self.groups.clone(),
            "grouped_epoch": self.grouped_epoch,
            "grouping": self.grouping,
            "num_groups": self.num_groups,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("groups")
        if groups is None:
            self.groups = None
            self._device_groups = None
        else:
            self.set_groups(groups)
        self.grouped_epoch = int(state.get("grouped_epoch", -1))


__all__ = ["GBGRule", "last_layer_parameters", "parse_group_at"]
