"""The trainer: one loop for every task, composed from the run's config; it knows methods and tasks only
through the contracts of :mod:`gradtail.contracts` (docs/architecture.md).

What a run is made of comes from its task (:class:`~gradtail.contracts.TaskContract`: the data, the model,
the loss as the task applies it, the evaluation) and the registries (regularizers, update rules, post-hoc
adjusters, the gradient-ratio observer), after :func:`gradtail.engine.components.check_component_params`
has checked that the task takes them. One step: batch -> ``update_rule(ctx, x, y)`` (the task's loss of the
batch, backward) -> gradient clipping -> ``optimizer.step()``. Evaluation follows the protocol: the
validation split every ``train.eval_every`` epochs and at the last (it selects the epoch), the test split
once, after the last epoch (and once for the validation-selected epoch's weights).

Runs write into their output directory through :class:`gradtail.rundir.RunDirectory` (its layout and the
refuse / resume / overwrite rules live there). A run resumed from its last checkpoint continues
bit-identically on CPU (same order, augmentation, RNG, buffers).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradtail.config import RunConfig, dump_config
from gradtail.contracts import (
    EvalReport,
    EvalView,
    LossContract,
    PosthocAdjuster,
    RunData,
    StepContext,
    StepObserver,
    StepOutput,
    TaskContract,
    TrainingView,
    UpdateRule,
    create_task,
)
from gradtail.distributed import (
    all_gather_objects,
    average_gradients_,
    gather_strided,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from gradtail.engine.checkpoint import capture_rng_state, restore_rng_state, seed_everything
from gradtail.engine.components import check_component_params
from gradtail.engine.schedule import LRSchedule
from gradtail.environment import configure_cpu_allocator, environment_info, resolve_amp, resolve_device
from gradtail.errors import ConfigError, DataError, GradtailError, OutputError, TrainingError
from gradtail.metrics import EvalResult, GroupRule, evaluate_logits, resolve_shot_groups
from gradtail.optim import create_update_rule
from gradtail.posthoc import POSTHOC, create_posthoc
from gradtail.regularizers import create_regularizer
from gradtail.rundir import (
    CHECKPOINT_VERSION,
    CONFIG,
    DIAGNOSTICS,
    ENVIRONMENT,
    FINAL,
    PREDICTIONS,
    SUBSET,
    RunDirectory,
    load_checkpoint,
    resume_config_changes,
)
from gradtail.tracking import Nesting, Tracker, group_means, start_tracking


@dataclass
class Predictions:
    logits: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None


class Trainer:
    """Train and evaluate one run described by a :class:`RunConfig`, whatever its task.

    Args:
        cfg: the resolved configuration.
        data: pre-built data (tests, harness, ``gradtail tune``'s validation-only view); by default the
            task builds it from the config.
        output_dir: overrides ``cfg.train.output_dir``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        data: RunData | None = None,
        output_dir: str | Path | None = None,
        verbose: bool = True,
    ):
        check_component_params(cfg)  # families the task takes, every params mapping, before any work
        self.cfg = cfg
        self.verbose = verbose
        self.task: TaskContract = create_task(cfg)
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = resolve_device(t.device)
        self.allocator = configure_cpu_allocator(t.cpu_allocator, self.device)  # process-wide, speed only
        self.out = Path(output_dir) if output_dir is not None else cfg.output_path()
        self.run_dir = RunDirectory(self.out, writer=is_main_process())
        self.best_dir = self.run_dir  # where the validation-selected weights are (eval: the run's)
        seed_everything(t.seed)
        self.data: RunData = data if data is not None else self.task.build_data()
        # an unwritable output fails before any training (after the data: a run whose data is missing
        # leaves no empty output folder behind)
        self.run_dir.ensure_writable()
        c = self.data.num_classes

        # --- model and loss (the task's), regularizer, update rule, observers (registries)
        loss = self.task.build_loss(self.data)
        self.model: nn.Module = self.task.build_model(self.data, loss).to(self.device)
        self.loss_fn: LossContract = loss.to(self.device)
        self.regularizer = (
            create_regularizer(cfg.regularizer.name, **cfg.regularizer.params)
            if cfg.regularizer.name
            else None
        )
        if self.regularizer is not None:
            self.regularizer.setup(self.model, c)  # terms with their own parameters create them here
            self.regularizer.to(self.device)
        self.update_rule: UpdateRule = create_update_rule(
            cfg.update_rule.name or "plain", **cfg.update_rule.params
        )
        if cfg.eval.posthoc and not self.data.has_split("val"):
            tuned = [n for n in cfg.eval.posthoc if self._create_posthoc(n).needs_validation()]
            if tuned:
                raise ConfigError(
                    f"eval.posthoc {tuned} tune on a validation split and this data has none "
                    "(data.val_per_class > 0, or a dataset with a validation list); or fix their parameters "
                    "(e.g. eval.posthoc_params.gala_rebalance: {tau: 1.5, tune: false})"
                )
        self.observers: list[StepObserver] = []
        self.diagnostics = None
        if t.diagnostics:
            from gradtail.diagnostics import GradientRatioObserver

            channels = self.task.observed_classes(self.data, self.loss_fn)
            self.diagnostics = GradientRatioObserver(channels).to(self.device)
            self.observers.append(self.diagnostics)
        if not self.task.attach_observers(self.model, self.observers):  # nothing hands out logits
            self.observers, self.diagnostics = [], None

        o = cfg.optim
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            self.params + self._regularizer_parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
        )
        self.schedule = LRSchedule.from_config(o)
        self.precision = resolve_amp(t.amp, self.device)  # train.amp: auto -> bf16 where native
        self.autocast_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.resolved == "fp16" else None
        if self.diagnostics is not None:
            self.diagnostics.set_grad_scaler(self.scaler)

        self.train_model: nn.Module = self.model
        if is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

        # --- data loading (the bundle's loader: in-memory arrays, image files, detection images alike)
        self.train_loader = self.data.train_loader(cfg, self.device, rank(), world_size())
        self._check_views()
        self.total_steps = o.epochs * len(self.train_loader)  # the multistep schedule's run length

        # --- state that checkpoints carry
        self.epoch = 0  # next epoch to run
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # val-selected epoch record
        self.resumes: list[dict[str, Any]] = []  # each resume: the epoch and the safe config changes
        self._in_epoch: dict[str, Any] | None = None  # a mid-epoch checkpoint's place (resume there)
        # experiment trackers (log:), started by fit; tune nests a trial's MLflow run under its study's
        self.tracker = Tracker()
        self.tracking_nesting: Nesting | None = None

    # ------------------------------------------------------------------ what update rules may read
    def training_view(self) -> TrainingView:
        """The read-only view of the run an update rule gets between epochs (GBG's grouping pass)."""
        channels_last = self.cfg.train.channels_last

        def normalize(x: torch.Tensor) -> torch.Tensor:
            x = self.data.normalize(x)
            return x.contiguous(memory_format=torch.channels_last) if channels_last else x

        return TrainingView(
            model=self.model,
            train_images=self.train_loader.images,
            train_labels=self.train_loader.labels,
            num_classes=self.data.num_classes,
            class_counts=self.data.class_counts,
            loss_fn=self.loss_fn,
            normalize=normalize,
        )

    # ------------------------------------------------------------------ helpers
    def _regularizer_parameters(self) -> list[nn.Parameter]:
        if self.regularizer is None:
            return []
        return [p for p in self.regularizer.parameters() if p.requires_grad]

    def _check_views(self) -> None:
        """The extra views the training loader makes (``data.augment.views``) must match what the
        regularizer uses (checked on the loader, which may come from a bundle built by someone else)."""
        made = self.train_loader.num_views
        wanted = self.regularizer.num_views if self.regularizer is not None else 0
        if made != wanted:
            who = f"regularizer {self.cfg.regularizer.name!r}" if self.regularizer is not None else "no term"
            raise ConfigError(
                f"data.augment.views is {made} but {who} uses {wanted} extra views per image; "
                f"set data.augment.views: {wanted}"
            )

    def _set_train_mode(self) -> None:
        self.task.train_mode(self.model)
        if self.regularizer is not None:
            self.regularizer.train()

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ training
    def train_epoch(self, epoch: int, progress: bool = True) -> dict[str, Any]:
        """One epoch of training steps; its record (mean loss and parts, lr, time, steps). Resumed from a
        mid-epoch checkpoint (``train.checkpoint_every_steps``), the loader replays the epoch's first
        batches without training on them (so every random draw the data makes is drawn again), the RNG
        states of the checkpoint are restored after the last replayed batch, and the epoch's partial sums
        continue: the epoch ends as if it had not stopped."""
        self._set_train_mode()
        self.loss_fn.train()
        self.loss_fn.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        n_steps = len(self.train_loader)
        if n_steps == 0:
            raise ConfigError(
                "the training loader yields no batch (batch_size larger than the data with drop_last)"
            )
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        extras_sum: dict[str, Any] = {}
        skip, elapsed = 0, 0.0
        resume, self._in_epoch = self._in_epoch, None
        if resume is not None and int(resume["epoch"]) == epoch:
            skip, elapsed = int(resume["step"]), float(resume["seconds"])
            loss_sum += float(resume["loss_sum"])
            first_bad.fill_(int(resume["first_bad"]))
            extras_sum = {k: float(v) for k, v in resume["extras_sum"].items()}
        every = self.cfg.train.checkpoint_every_steps
        bar = _progress(n_steps, f"epoch {epoch + 1}/{self.cfg.optim.epochs}", progress)
        if bar is not None and skip:
            bar.update(skip)
        start = time.perf_counter() - elapsed
        for i, batch in enumerate(self.train_loader):
            if i < skip:  # replayed: the data's random draws are made again, nothing is trained
                if i == skip - 1:
                    self._restore_rng(resume["rng"])  # type: ignore[index]
                continue
            lr = self.schedule.lr_for_step(self.global_step, epoch, i, n_steps, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            out = self.train_step(batch[0], batch[1], epoch, views=batch[2] if len(batch) > 2 else None)
            # Non-finite check without a device sync per step: remember the first bad step on device.
            loss = out.loss.detach().to(torch.float64)
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(
                bad & (first_bad < 0), torch.full_like(first_bad, self.global_step), first_bad
            )
            loss_sum += torch.where(bad, torch.zeros_like(loss), loss)
            for k, v in out.extras.items():  # tensors stay on the device until the epoch's end
                v = v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else float(v)
                extras_sum[k] = extras_sum.get(k, 0.0) + v
            self.global_step += 1
            if every and self.global_step % every == 0 and i + 1 < n_steps:
                seconds = time.perf_counter() - start
                self._save_in_epoch(epoch, i + 1, loss_sum, first_bad, extras_sum, seconds)
            if bar is not None:
                bar.update(1)
                if (i + 1) % 25 == 0 or i + 1 == n_steps:
                    self._check_finite(first_bad)
                    bar.set_postfix(loss=f"{float(loss_sum) / (i + 1):.4f}", lr=f"{lr:.4g}")
        if bar is not None:
            bar.close()
        self._check_finite(first_bad)
        record = {
            "train_loss": float(loss_sum) / n_steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_seconds": time.perf_counter() - start,
            "steps": n_steps,
        }
        record.update({k: float(v) / n_steps for k, v in extras_sum.items()})
        record.update(self.update_rule.epoch_summary())
        return record

    def train_step(self, x: Any, y: Any, epoch: int, views: torch.Tensor | None = None) -> StepOutput:
        """One optimisation step on a ready batch (and its extra views, if the run makes them): the update
        rule forms the gradient (over ``optim.accumulation_steps`` micro-batches), the gradient norm is
        clipped to ``optim.grad_clip``, then the optimizer steps (the learning rate is set by the caller).
        Benchmarks time exactly this."""
        self.optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(
            model=self.train_model,
            loss_fn=self.loss_fn,
            regularizer=self.regularizer,
            epoch=epoch,
            observers=self.observers,
            autocast=self.autocast,
            scaler=self.scaler,
            views=views,
            task=self.task,
        )
        k = self.cfg.optim.accumulation_steps
        out = self.update_rule(ctx, x, y) if k == 1 else self._accumulated(ctx, x, y, views, k)
        if is_distributed() and self.regularizer is not None:
            average_gradients_(self._regularizer_parameters())  # DDP reduces only the model's
        clip = self.cfg.optim.grad_clip
        if clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return out

    def _accumulated(
        self, ctx: StepContext, x: torch.Tensor, y: torch.Tensor, views: torch.Tensor | None, k: int
    ) -> StepOutput:
        """The batch's gradient from ``k`` micro-batches, one backward each: the loss normalises every
        micro-batch as its share of the whole batch and reads the statistics of before the step
        (:meth:`gradtail.losses.base.LongTailLoss.accumulate`; docs/losses.md)."""
        if views is not None or self.regularizer is not None:
            raise ConfigError("optim.accumulation_steps > 1 does not combine with regularizers or views")
        chunks_x, chunks_y = x.chunk(k), y.chunk(k)
        losses = []
        with contextlib.ExitStack() as one_step:
            one_step.enter_context(self.loss_fn.accumulate(targets=y))  # the union's normaliser, its labels
            if self.diagnostics is not None:  # the observer's hooked gradients: one step too
                one_step.enter_context(self.diagnostics.stats.accumulate())
            for xi, yi in zip(chunks_x, chunks_y, strict=True):
                losses.append(self.update_rule(ctx, xi, yi).loss)
        return StepOutput(loss=torch.stack(losses).sum(), logits=None)

    def _begin_on_every_rank(self, resume: bool | str | Path, overwrite: bool) -> dict[str, Any] | None:
        """:meth:`RunDirectory.begin` on every rank, the ranks agreeing: a refusal or a bad checkpoint on
        any rank is raised on all (none is left waiting in a collective), and ranks that found different
        checkpoints (an output directory that is not shared between the machines) stop the job."""
        state, failure = None, None
        try:
            state = self.run_dir.begin(resume, overwrite, map_location=self.device)
        except GradtailError as e:
            failure = e
        if not is_distributed():
            if failure is not None:
                raise failure
            return state
        found = None if state is None else (int(state["epoch"]), int(state["global_step"]))
        failed = None if failure is None else (type(failure).__name__, str(failure))
        seen = all_gather_objects((failed, found))
        if failure is not None:
            raise failure
        kinds = {k.__name__: k for k in (ConfigError, DataError, OutputError)}
        for r, (other, _) in enumerate(seen):
            if other is not None:
                raise kinds.get(other[0], OutputError)(f"rank {r}: {other[1]}")
        if len({f for _, f in seen}) > 1:
            where = ", ".join(f"rank {r}: {'none' if f is None else f'epoch {f[0]}, step {f[1]}'}"
                              for r, (_, f) in enumerate(seen))  # fmt: skip
            raise OutputError(
                f"the processes found different checkpoints to resume from in {self.out} ({where}): the "
                "output directory must be one that every machine sees (a shared file system)"
            )
        return state

    def _save_in_epoch(
        self,
        epoch: int,
        step: int,
        loss_sum: torch.Tensor,
        first_bad: torch.Tensor,
        extras_sum: dict[str, Any],
        seconds: float,
    ) -> None:
        """``checkpoints/last.pt`` after ``step`` steps of ``epoch``: the whole state (model, optimizer,
        loss statistics, scaler, RNG of every process) plus the epoch's place and partial sums."""
        state = self.state_dict()
        state["in_epoch"] = {
            "epoch": epoch,
            "step": step,
            "loss_sum": float(loss_sum),
            "first_bad": int(first_bad),
            "extras_sum": {k: float(v) for k, v in extras_sum.items()},
            "seconds": seconds,
            "world_size": world_size(),  # the place in the epoch is one of this many shards
        }
        self.run_dir.save_checkpoint(state, self.epoch, keep=0)

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        """This process's RNG states from a checkpoint's (each rank's own when it recorded every rank's)."""
        if "main" not in rng:  # a checkpoint that recorded one process's states only
            restore_rng_state(rng)
            return
        by_rank = rng.get("by_rank")
        own = by_rank[rank()] if by_rank is not None and len(by_rank) == world_size() else rng["main"]
        restore_rng_state(own)

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        step = int(first_bad)
        if step >= 0:
            raise TrainingError(
                f"non-finite training loss at global step {step} (epoch {self.epoch + 1}); lower the "
                "learning rate, check the inputs, or disable fp16"
            )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, split: str, features: bool = False) -> Predictions:
        """Logits (and features) of the ``val`` or ``test`` split, in dataset order (classification): each
        process computes its shard of the split (the data's ``eval_loader``), then every process gathers
        the whole (:func:`gradtail.distributed.gather_strided`), so metrics and post-hoc fits are the same
        on every rank and equal one process's."""
        self.model.eval()
        model: Any = self.model
        logits, feats, targets = [], [], []
        for x, y in self.data.eval_loader(split, self.cfg, self.device):
            with self.autocast():
                h = model.features(x)
                z = model.classifier(h)
            logits.append(self.loss_fn.inference_logits(z.float()))
            targets.append(y)
            if features:
                feats.append(h.float())
        if not logits:  # a shard without images (fewer images than processes)
            logits.append(torch.zeros(0, self.data.num_classes, device=self.device))
            targets.append(torch.zeros(0, dtype=torch.long, device=self.device))
            feats.append(torch.zeros(0, model.feature_dim, device=self.device))
        return Predictions(
            logits=gather_strided(torch.cat(logits)),
            targets=gather_strided(torch.cat(targets)),
            features=gather_strided(torch.cat(feats)) if features else None,
        )

    def group_rule(self) -> GroupRule:
        """The Many / Medium / Few thresholds of this run: ``eval.*_threshold``, or when null the rule of
        :func:`resolve_shot_groups` on the training counts (the same for every epoch and post-hoc row)."""
        e = self.cfg.eval
        return resolve_shot_groups(self.data.class_counts, e.many_threshold, e.few_threshold)

    def evaluate_predictions(self, logits: torch.Tensor, targets: torch.Tensor) -> EvalResult:
        groups = self.group_rule()
        return evaluate_logits(
            logits,
            targets,
            self.data.class_counts,
            groups.many_threshold,
            groups.few_threshold,
            self.cfg.eval.ece_bins,
        )

    def evaluate_split(self, split: str) -> EvalReport | None:
        if not self.data.has_split(split):
            return None
        return self.task.evaluate(self.eval_view(), split)

    def eval_view(self) -> EvalView:
        """What the run's task reads to evaluate a split (:class:`gradtail.contracts.TaskContract`)."""
        return EvalView(
            model=self.model, data=self.data, cfg=self.cfg, device=self.device, autocast=self.autocast,
            loss_fn=self.loss_fn, predict=self.predict, score=self.evaluate_predictions,
            group_rule=self.group_rule,
        )  # fmt: skip

    # ------------------------------------------------------------------ run
    def fit(
        self,
        resume: bool | str | Path = False,
        stop_after: int | None = None,
        overwrite: bool = False,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or stop after ``stop_after`` epochs of this call) and evaluate.

        ``on_epoch_end(record)`` sees each epoch's record once it is written and checkpointed (the tuner
        reports the validation metric there and may raise to stop a pruned trial).

        The output directory's rules (:mod:`gradtail.rundir`): without ``resume`` or ``overwrite`` a
        directory that already holds a run is refused. ``resume=True`` continues from the directory's
        last checkpoint when there is one (a fresh directory starts a new run); a path resumes from that
        checkpoint file. The config must equal the checkpoint's except in the resume-safe keys, whose
        changes are recorded in ``final.json`` (``resumes``). ``overwrite`` removes the previous run first.
        Returns the final metrics (also written to ``final.json``) once training is done, or the last
        epoch record when stopped early.
        """
        state = self._begin_on_every_rank(resume, overwrite)
        if state is not None:
            where = self.out if resume is True else Path(str(resume))
            changes = resume_config_changes(
                state["config"], self.cfg.to_dict(), where, extra_safe=self.task.resume_safe
            )
            self.load_state(state)
            at = {"at_epoch": self.epoch}
            if self._in_epoch is not None:  # a mid-epoch checkpoint: the steps of the epoch it had done
                at["at_step"] = int(self._in_epoch["step"])
            self.resumes.append({**at, "changed": changes})
        self._write_run_header()
        self.tracker = start_tracking(self.cfg, self.run_dir, self.history, state is not None,
                                      self.tracking_nesting)  # fmt: skip
        progress = self.cfg.train.progress and is_main_process()
        epochs = self.cfg.optim.epochs
        ran = 0
        while self.epoch < epochs:
            if stop_after is not None and ran >= stop_after:
                self.tracker.close("KILLED")
                return self.history[-1] if self.history else {}
            epoch = self.epoch
            if self._in_epoch is None:  # resumed mid-epoch: the rule's state is the checkpoint's
                self.update_rule.on_epoch_start(epoch, self.training_view())
            record: dict[str, Any] = {"epoch": epoch + 1}
            record.update(self.train_epoch(epoch, progress=progress))
            last = epoch + 1 == epochs
            if last or (epoch + 1) % self.cfg.train.eval_every == 0:
                record.update(self._epoch_eval(epoch + 1))
            if self.diagnostics is not None:  # the mean gradient ratio of each class group
                g = self.diagnostics.end_epoch(epoch + 1)["g"]
                record["grad_ratio"] = group_means(g, self.task.class_groups(self.eval_view()))
            self.history.append(record)
            self.epoch = epoch + 1
            ran += 1
            self.run_dir.append_metrics(record)
            if last or self.epoch % self.cfg.train.checkpoint_every == 0:
                self.save()
            self.tracker.log_epoch(record)
            if self.verbose and is_main_process():
                print(_epoch_line(record, epochs), flush=True)
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self.finish()

    def _epoch_eval(self, epoch: int) -> dict[str, Any]:
        """The epoch's validation record (it selects the epoch: the best one's weights are kept in
        ``checkpoints/best.pt``); the test split only with ``eval.test_curve`` (a curve, never selected
        on). Data without a validation split (no selection) are not evaluated between epochs."""
        rec: dict[str, Any] = {}
        val = self.evaluate_split("val")
        if val is not None:
            key = f"val_{val.primary_metric}"  # the task's selection metric
            rec["val"] = val.val_record()
            if self.best is None or val.primary > self.best[key]:
                self.best = {"epoch": epoch, key: val.primary, "test": None}
                self.run_dir.save_best(self._weights())
        if self.cfg.eval.test_curve:
            test = self.evaluate_split("test")
            if test is not None:
                rec["test_curve"] = test.summary()
        return rec

    def _weights(self) -> dict[str, Any]:
        """What evaluation needs of the current epoch: the model's and the loss's state."""
        return {"epoch": self.epoch + 1, "model": self.model.state_dict(), "loss": self.loss_fn.state_dict()}

    @contextlib.contextmanager
    def _with_weights(self, weights: dict[str, Any]) -> Iterator[None]:
        """Evaluate with other weights (the validation-selected epoch's), then restore the current ones."""
        current = {k: {n: v.clone() for n, v in sd.items()} for k, sd in
                   (("model", self.model.state_dict()), ("loss", self.loss_fn.state_dict()))}  # fmt: skip
        self.model.load_state_dict(weights["model"])
        self.loss_fn.load_state_dict(weights["loss"])
        try:
            yield
        finally:
            self.model.load_state_dict(current["model"])
            self.loss_fn.load_state_dict(current["loss"])

    def finish(self) -> dict[str, Any]:
        """The test split, evaluated once after the last epoch (and once with the validation-selected
        epoch's weights when that is another epoch), post-hoc adjusters, the run's predictions figure;
        written to ``final.json``. Without a test split (``gradtail tune``'s trials) ``last_epoch`` is None
        and no post-hoc adjuster is fitted."""
        test = self.evaluate_split("test")
        if test is not None and self.best is not None:
            if self.best["epoch"] == self.epoch:
                self.best["test"] = test.summary()
            else:
                weights = self.best_dir.load_best(map_location=self.device)
                with self._with_weights(weights):
                    selected = self.evaluate_split("test")
                self.best["test"] = selected.summary() if selected is not None else None
        steps = sum(r.get("steps", 0) for r in self.history)
        train_seconds = sum(r.get("train_seconds", 0.0) for r in self.history)
        final: dict[str, Any] = {
            "name": self.cfg.name,
            "task": self.cfg.task,
            "config_hash": self.cfg.hash(),
            "subset_sha256": self.data.sha256,
            "class_counts": self.data.class_counts,
            "groups": self.task.groups(self.eval_view()),
            "epochs": self.epoch,
            "last_epoch": test.to_dict() if test is not None else None,
            "val_selected": self.best,
            "posthoc": self._posthoc() if test is not None else {},
            "train_seconds": train_seconds,
            "mean_step_s": train_seconds / steps if steps else None,
            "amp": self.precision.to_dict(),
            "update_rule_state": _jsonable(self.update_rule.state_dict()),
            "resumes": self.resumes,
        }
        val = self.evaluate_split("val")
        if val is not None:
            final["val_last_epoch"] = val.val_record()
        self.run_dir.write_json(FINAL, final)
        if self.diagnostics is not None:
            self.run_dir.write_json(DIAGNOSTICS, self.diagnostics.to_json(), indent=1)
        if test is not None and is_main_process():
            self.task.draw_predictions(self.eval_view(), self.run_dir.file(PREDICTIONS))
        self.tracker.log_final(final, self.epoch)
        self.tracker.close()
        return final

    def _posthoc(self) -> dict[str, Any]:
        names = self.cfg.eval.posthoc
        if not names:
            return {}
        # without a validation split only adjusters with given parameters run (checked in __init__): no fit
        val_pred = self.predict("val", features=True) if self.data.has_split("val") else None
        test_feats = self.predict("test", features=True)
        results: dict[str, Any] = {}
        for name in names:
            params = dict(self.cfg.eval.posthoc_params.get(name, {}))
            adjuster = self._create_posthoc(name)
            if adjuster.input_kind == "features":
                assert test_feats.features is not None
                if val_pred is not None:
                    assert val_pred.features is not None
                    adjuster.fit(val_pred.features, val_pred.targets)
                logits = adjuster.transform(test_feats.features)
            else:
                if val_pred is not None:
                    adjuster.fit(val_pred.logits, val_pred.targets)
                logits = adjuster.transform(test_feats.logits)  # the test logits, computed with the features
            res = self.evaluate_predictions(logits, test_feats.targets)
            results[name] = {"params": adjuster.fitted_params(), **res.to_dict(include_confusion=False)}
            state = adjuster.state_dict()
            if state is not None:  # extras/posthoc/<name>.pt: gradtail predict --posthoc applies it
                record = {"name": name, "params": params, "input_kind": adjuster.input_kind}
                record |= {"epoch": self.epoch, "subset_sha256": self.data.sha256, "state": state}
                self.run_dir.save_posthoc(name, record)
        return results

    def _create_posthoc(self, name: str) -> PosthocAdjuster:
        """The adjuster ``name`` as the config gives it (its ``eval.posthoc_params`` and the inputs it
        declares), not fitted."""
        params = dict(self.cfg.eval.posthoc_params.get(name, {}))
        return create_posthoc(name, **self._posthoc_args(name, params))

    def _posthoc_args(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        wants = POSTHOC.get(name).construction_inputs  # type: ignore[attr-defined]
        extra: dict[str, Any] = {}
        if "class_counts" in wants:
            extra["class_counts"] = self.data.class_counts
        if "classifier" in wants:
            extra["classifier"] = self.model.classifier
        return {**extra, **params}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loss": self.loss_fn.state_dict(),
            "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
            "update_rule": self.update_rule.state_dict(),
            "diagnostics": self.diagnostics.state_dict() if self.diagnostics is not None else None,
            "history": self.history,
            "best": self.best,
            "resumes": self.resumes,
            "rng": self._capture_rng(),
            "class_counts": self.data.class_counts,
            "class_names": self.data.class_names,
            "preprocessing": self.data.preprocessing(),
            "subset_sha256": self.data.sha256,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("subset_sha256") != self.data.sha256:
            raise ConfigError("checkpoint was trained on a different training subset (hash mismatch)")
        in_epoch = state.get("in_epoch")
        if in_epoch is not None and int(in_epoch.get("world_size", 1)) != world_size():
            raise ConfigError(
                f"the checkpoint was written in the middle of epoch {int(in_epoch['epoch']) + 1} by "
                f"{int(in_epoch.get('world_size', 1))} process(es), this run has {world_size()}: resume it "
                "with as many, or from an epoch checkpoint (--resume <run>/checkpoints/epoch_NNNN.pt)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.load_state_dict(state["loss"])
        if self.regularizer is not None and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        self.update_rule.load_state_dict(state.get("update_rule") or {})
        if self.diagnostics is not None and state.get("diagnostics") is not None:
            self.diagnostics.load_state_dict(state["diagnostics"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best = state.get("best")
        self.resumes = list(state.get("resumes", []))
        self._in_epoch = None if in_epoch is None else {**in_epoch, "rng": state["rng"]}
        self._restore_rng(state["rng"])
        self.run_dir.rewrite_metrics(self.history)

    def _capture_rng(self) -> dict[str, Any]:
        """The RNG states of this process (``main``) and, under DDP, of every process (``by_rank``: a
        resume with the same number of processes gives each its own back)."""
        own = capture_rng_state()
        return {"main": own, "by_rank": all_gather_objects(own) if is_distributed() else None}

    def save(self) -> None:
        """``checkpoints/last.pt`` and the kept epoch checkpoints (rank 0 writes)."""
        self.run_dir.save_checkpoint(self.state_dict(), self.epoch, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ files
    def _write_run_header(self) -> None:
        env = environment_info(self.device) | {
            "world_size": world_size(),
            "amp": self.precision.to_dict(),
            "cpu_allocator": self.allocator,
        }
        subset = {"task": self.cfg.task, "dataset": self.cfg.data.dataset} | self.data.describe()
        self.run_dir.write_text(CONFIG, dump_config(self.cfg))
        self.run_dir.write_json(ENVIRONMENT, env)
        self.run_dir.write_json(SUBSET, subset)


def load_run_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A run's checkpoint (``gradtail eval`` / ``predict``): :func:`gradtail.rundir.load_checkpoint`."""
    return load_checkpoint(path, map_location=device)


def _jsonable(value: Any) -> Any:
    """Tensors -> lists, recursively (for update-rule state in final.json, e.g. GBG's class groups)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


def _fmt(v: float | None) -> str:
    return "N/A" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"loss {record['train_loss']:.4f}",
        f"lr {record['lr']:.4g}",
        f"{record['train_seconds']:.1f}s",
    ]
    if "val" in record:
        parts.append("val " + " ".join(f"{k} {_fmt(v)}" for k, v in list(record["val"].items())[:5]))
    if "test_curve" in record:
        shown = list(record["test_curve"].items())[:5]
        parts.append("test curve " + " ".join(f"{k} {_fmt(v)}" for k, v in shown))
    return " | ".join(parts)
