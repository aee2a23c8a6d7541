"""The contracts between the trainer and the method families, in the bottom layer of the package.

The trainer (``gradtail.engine``) knows a method only through the members declared here; every method
family (``gradtail.losses``, ``gradtail.regularizers``, ``gradtail.optim``, ``gradtail.posthoc``) and the
data layer implement them and import this module, never the engine. A hook the trainer reads is a
declared member with a default, never an attribute probed with ``getattr`` / ``hasattr``.

- :class:`LossContract`: ``forward(logits, targets)``, ``set_epoch``, ``inference_logits``,
  ``required_head``, ``report_note`` (every loss derives from :class:`gradtail.losses.base.LongTailLoss`,
  which implements it);
- :class:`Regularizer`: ``forward(...)``, ``setup(model, num_classes)``, ``start_epoch``, ``num_views``,
  ``report_note``;
- :class:`UpdateRule`: ``__call__(ctx, x, y)`` with a :class:`StepContext`, ``on_epoch_start(epoch, view)``
  with a :class:`TrainingView`, ``epoch_summary()``, ``state_dict`` / ``load_state_dict``, ``report_note``;
- :class:`PosthocAdjuster`: ``fit`` / ``transform`` on ``input_kind`` (logits or features),
  ``construction_inputs``, ``fitted_params()``, ``state_dict`` / ``load_state_dict``, ``report_note``,
  ``logit_affine`` / ``feature_head`` (the fitted transform as a linear map, for ``gradtail export``);
- :class:`StepObserver`: ``observe(logits, targets)``;
- :class:`TaskContract`: ``forward(model, inputs, batch)``, ``adapt_loss``, ``evaluate(view, split)``
  returning an :class:`EvalReport`, ``groups``, ``class_groups``, ``check``, ``predict`` / ``export``
  (``gradtail predict`` / ``gradtail export``, with :class:`PredictRequest` / :class:`ExportRequest`): what
  differs between classification and dense prediction (segmentation; detection), so the trainer has no
  task branch;
- :class:`TrainLoader` and :class:`RunData`: the data of a run (counts, class names, subset hash, loaders,
  the test-time preprocessing).

:func:`unwrap_model` is the one helper that takes a model out of its DistributedDataParallel wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from gradtail.registry import Registry
from gradtail.search_space import SearchSpace

# --------------------------------------------------------------------------- models


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself when it is wrapped by ``DistributedDataParallel`` / ``DataParallel``.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(net) is net
        True
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


# --------------------------------------------------------------------------- losses


class LossContract(nn.Module):
    """What the trainer reads from a loss; :class:`gradtail.losses.base.LongTailLoss` implements it.

    - ``forward(logits, targets) -> scalar`` (an ``nn.Module`` usable in any loop);
    - :meth:`set_epoch` at the start of every epoch (deferred schedules such as DRW read it);
    - :meth:`inference_logits`: the logits as the loss reads them at test time;
    - ``required_head``: the classifier head a loss is defined on (``"cosine"`` for LDAM), None for any;
    - ``report_note``: a sentence the benchmark report prints under its table, or None;
    - ``search_space``: the constructor parameters ``gradtail tune`` searches (:mod:`gradtail.search_space`),
      empty for a loss without hyperparameters.
    """

    required_head: ClassVar[str | None] = None
    report_note: ClassVar[str | None] = None
    search_space: ClassVar[SearchSpace] = {}

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch (0-based)."""
        return None

    def inference_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits as the loss reads them, for prediction and calibration (identity here)."""
        return logits

    def accumulate(
        self, total: Any = None, *, targets: torch.Tensor | None = None
    ) -> AbstractContextManager[None]:  # pragma: no cover - interface
        """Gradient accumulation: the micro-batches of one optimizer step called inside give the gradients
        and statistics of one batch of their union (``total``: its normaliser, or ``targets``: its labels;
        :meth:`gradtail.losses.base.LongTailLoss.accumulate`, docs/losses.md)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- regularizers


class Regularizer(nn.Module):
    """A term computed from one forward pass, added to the loss before the single backward.

    ``forward(features, logits, targets, loss, model, view_features=None) -> scalar``. ``loss`` is the base
    loss of this step (attached to the graph), so a regularizer can take
    ``autograd.grad(loss, logits, create_graph=True)`` to get the base loss's gradient at the raw logits
    without calling a (possibly stateful) loss again.

    - ``start_epoch``: the trainer adds the term only from this epoch on.
    - ``num_views``: extra augmented views of each image the term needs (contrastive terms such as BCL);
      the data config must produce exactly that many (``data.augment.views``). Their backbone features
      come from the same forward as the batch's (one pass over [x; views]) as ``view_features``,
      (num_views * B, feature_dim), view-major.
    - :meth:`setup` is called once by the trainer, before the optimizer is built, with the model: a term
      with its own parameters (projection heads) creates them there; they are trained with the model,
      checkpointed with the term's ``state_dict``, and averaged over processes under DDP.
    - ``report_note``: a sentence the benchmark report prints under its table, or None.
    - ``search_space``: the constructor parameters ``gradtail tune`` searches (:mod:`gradtail.search_space`).
    """

    start_epoch: int = 0
    num_views: int = 0
    report_note: ClassVar[str | None] = None
    search_space: ClassVar[SearchSpace] = {}

    def setup(self, model: nn.Module, num_classes: int) -> None:
        return None

    def forward(  # pragma: no cover - interface
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        model: nn.Module,
        view_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- observers


@runtime_checkable
class StepObserver(Protocol):
    """Sees (logits, targets) of every training step, logits still attached (it may hook their gradient)."""

    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...


# --------------------------------------------------------------------------- tasks


@runtime_checkable
class EvalReport(Protocol):
    """The evaluation of one split, whatever the task (classification's
    :class:`gradtail.metrics.EvalResult`, segmentation's :class:`gradtail.metrics.SegmentationResult`,
    detection's :class:`gradtail.metrics.detection.DetectionMetrics`).

    - ``primary_metric`` / :attr:`primary`: the validation metric that selects the epoch (higher is
      better): the task's :attr:`TaskContract.selection_metric`;
    - :meth:`summary`: the compact record of an epoch (``metrics.jsonl``);
    - :meth:`val_record`: the ``val`` entry of an epoch record (what ``gradtail tune`` reads);
    - :meth:`to_dict`: the full record (``final.json``'s ``last_epoch``).
    """

    primary_metric: str

    @property
    def primary(self) -> float: ...

    def summary(self) -> dict[str, Any]: ...

    def val_record(self) -> dict[str, Any]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EvalView:
    """What a task reads to evaluate a split; built by the trainer.

    ``model``: the model itself (unwrapped); ``data``: the run's :class:`RunData`; ``cfg``: the run config;
    ``autocast``: the run's autocast context; ``loss_fn``: the training loss (its ``inference_logits``);
    ``predict(split)``: the trainer's logits of a split (classification), ``score(logits, targets)``: its
    metrics; ``group_rule()``: the Many / Medium / Few rule of the run's counts.
    """

    model: nn.Module
    data: Any
    cfg: Any
    device: torch.device
    autocast: Callable[[], AbstractContextManager[Any]]
    loss_fn: nn.Module
    predict: Callable[[str], Any]
    score: Callable[[torch.Tensor, torch.Tensor], Any]
    group_rule: Callable[[], Any]


@dataclass(frozen=True)
class Accepts:
    """The method families a task takes: the names of registered components it can apply (``None``: every
    registered one; ``()``: none), and whether the gradient-ratio diagnostics observe its loss.

    Example:
        >>> Accepts.refusal("update rule", "gbg", "segmentation", ("plain",))
        "task 'segmentation' does not take the update rule 'gbg'; it takes: plain"
    """

    losses: tuple[str, ...] | None = None
    regularizers: tuple[str, ...] | None = None
    update_rules: tuple[str, ...] | None = None
    posthoc: tuple[str, ...] | None = None
    samplers: tuple[str, ...] | None = None

    @staticmethod
    def refusal(family: str, name: str, task: str, allowed: tuple[str, ...] | None = ()) -> str:
        """The one-line message for a component the task does not take."""
        takes = ", ".join(allowed) if allowed else "none"
        return f"task {task!r} does not take the {family} {name!r}; it takes: {takes}"


@dataclass(frozen=True)
class PredictRequest:
    """What ``gradtail predict`` asks of a task: ``inputs`` (image files, folders, lists) or ``split``
    (``val`` / ``test`` of the run's own data, rebuilt from its config), where to write (``output``; None:
    standard output where the format allows), and the options of the tasks that take them (``top_k``,
    ``posthoc``: classification; ``draw``: drawn predictions)."""

    inputs: tuple[str, ...] = ()
    split: str | None = None
    output: str | None = None
    posthoc: str | None = None
    top_k: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    draw: bool = False


@dataclass(frozen=True)
class ExportRequest:
    """What ``gradtail export`` asks of a task: the ``format`` (``onnx`` or ``torchscript``), where to
    write the model file (``output``; None: ``<run>/export/model.<ext>``; its JSON sidecar beside it) and
    the fitted post-hoc adjuster to fold into the model (``posthoc``: classification)."""

    format: str = "onnx"
    output: str | None = None
    posthoc: str | None = None


@dataclass
class StepLoss:
    """What a task's :meth:`TaskContract.train_loss` returns for one batch: the loss to back-propagate
    (attached), the logits the loss saw (detached; ``None`` when they stay inside the model, as in a
    detector's heads) and named parts to log (each loss term of a detector), as tensors or floats."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    parts: dict[str, Any] = field(default_factory=dict)


class TaskContract:
    """A task: what differs between classification, semantic segmentation, detection, ... (the engine,
    the CLI, ``bench``, ``tune`` and the report know a task only through these members).

    A task is registered in :data:`TASKS` under its ``name`` and constructed with the run config
    (``task(cfg)``). It declares:

    - configuration: ``options`` (the dataclass of its own config section, whose YAML key is the task's
      name; ``None``: no section), ``defaults`` (config values its runs start from, under the files'),
      ``data_keys`` (the ``data.*`` keys its data builders read; a config setting another is refused),
      ``resume_safe`` (keys of its section a resumed run may change: where its files are),
      :meth:`accepts` (which losses, regularizers, update rules, post-hoc adjusters and samplers it
      applies) and :meth:`check` (its own cross-key checks);
    - building: :meth:`build_data`, :meth:`build_loss` (the registry's loss as the task applies it: per
      sample, per pixel, per RoI, per anchor), :meth:`build_model` (which may install the loss, as in a
      detector's heads) and :meth:`observed_classes` (the channels the gradient-ratio diagnostics see);
    - the step: :meth:`forward` (features and logits of a batch, for update rules that need them) and
      :meth:`train_loss` (the loss of a batch);
    - evaluation: :meth:`evaluate` (an :class:`EvalReport`, metric state reduced across processes),
      ``selection_metric`` (the validation metric that selects the epoch), ``objectives`` (those
      ``gradtail tune`` may maximise, the first the default) and :meth:`objective`, :meth:`groups` (the
      class-group rule of ``final.json``), :meth:`draw_predictions` (the run's predictions figure);
    - presentation: :meth:`final_rows`, :meth:`headline`, :meth:`predictor` (``gradtail predict``) and
      :meth:`report` (the sections its report adds), implemented by each task with its own modules.

    This base class is image classification's behaviour where a member has an obvious default.

    Example:
        >>> import torch
        >>> from gradtail.models import create_model
        >>> model = create_model("small_cnn", num_classes=3)
        >>> h, z = TaskContract(None).forward(model, torch.zeros(2, 1, 28, 28), 2)
        >>> tuple(z.shape)
        (2, 3)
    """

    name: ClassVar[str] = "classification"
    options: ClassVar[type | None] = None
    defaults: ClassVar[Mapping[str, Any]] = {}
    data_keys: ClassVar[frozenset[str] | None] = None
    resume_safe: ClassVar[frozenset[str]] = frozenset()
    selection_metric: ClassVar[str] = "balanced_accuracy"
    objectives: ClassVar[tuple[str, ...]] = ("balanced_accuracy",)

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @classmethod
    def catalog(cls) -> dict[str, list[str]]:
        """What ``gradtail list`` shows for the task: its datasets, models and the losses they take."""
        return {}

    # ------------------------------------------------------------------ configuration
    def accepts(self) -> Accepts:
        """Which method families this run's task takes (may depend on the config: a detector's
        architecture decides its losses)."""
        return Accepts()

    def check(self) -> None:
        """The task's own checks across keys (one-line :class:`ConfigError`); after the families'."""
        return None

    # ------------------------------------------------------------------ building
    def build_data(self) -> RunData:  # pragma: no cover - interface
        raise NotImplementedError

    def build_loss(self, data: RunData) -> LossContract:  # pragma: no cover - interface
        raise NotImplementedError

    def build_model(self, data: RunData, loss: LossContract) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def observed_classes(self, data: RunData, loss: LossContract) -> int:
        """The logit channels the gradient-ratio diagnostics observe (the loss's input channels)."""
        return int(data.num_classes)

    def attach_observers(self, model: nn.Module, observers: Sequence[StepObserver]) -> bool:
        """Let ``observers`` see the (logits, targets) the loss gets, where the step does not hand them
        out itself (a detector's heads); False when the model has no logits to hand out (a stock head).
        Classification and segmentation observe in the step."""
        return True

    def train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode for an epoch (classification keeps a frozen backbone in eval)."""
        model.train()

    # ------------------------------------------------------------------ the step
    def forward(
        self, model: nn.Module, inputs: torch.Tensor, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of ``inputs`` (the batch, then any extra views: ``batch`` rows are the
        batch's own) through ``model`` (the DDP wrapper under ``torchrun``)."""
        network: Any = unwrap_model(model)
        if model is not network:  # DDP: go through the wrapper so gradients are reduced
            h, z = model(inputs, return_features=True)
            return h, z[:batch]
        h = network.features(inputs)
        return h, network.classifier(h[:batch])

    def train_loss(self, ctx: StepContext, inputs: Any, targets: Any) -> StepLoss:
        """The loss of one batch: features and logits through :meth:`StepContext.forward` (observers see
        the logits), then the base loss plus the regularizer's term (:meth:`StepContext.criterion`)."""
        h, z = ctx.forward(inputs, targets)
        return StepLoss(ctx.criterion(h, z, targets), logits=z.detach())

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, view: EvalView, split: str) -> EvalReport:
        pred = view.predict(split)
        report: EvalReport = view.score(pred.logits, pred.targets)
        return report

    def groups(self, view: EvalView) -> dict[str, Any]:
        record: dict[str, Any] = view.group_rule().to_dict()
        return record

    def class_groups(self, view: EvalView) -> dict[str, list[int]]:
        """The classes of each of the run's class groups, by group name (Many / Medium / Few; frequent /
        common / rare; r / c / f): the trainer summarises the gradient ratios per group with them
        (``grad_ratio`` in ``metrics.jsonl``). The default reads the ``classes`` of :meth:`groups`."""
        classes = self.groups(view).get("classes") or {}
        return {str(name): [int(c) for c in members] for name, members in classes.items()}

    def draw_predictions(self, view: EvalView, path: Any) -> bool:
        """Draw a few test predictions into ``path`` (PNG); False when the task draws none."""
        return False

    def search_space(self) -> list[Any]:
        """The parameters ``gradtail tune`` searches for this run by default (the ones its loss, regularizer
        and update rule declare, :func:`gradtail.tasks.spaces.method_search_space`)."""
        return []

    def objective(self, val: Mapping[str, Any], name: str, weight: float = 0.5) -> float:
        """The value of the validation metric ``name`` (one of ``objectives``) in an epoch's ``val`` record
        (``weight``: the Few share of classification's ``mix``)."""
        if name not in self.objectives:
            raise _config_error(
                f"tune objective {name!r} is not one of task {self.name!r}'s: {', '.join(self.objectives)}"
            )
        return float(val[name])

    # ------------------------------------------------------------------ presentation
    def final_rows(self, final: Mapping[str, Any], label: str) -> tuple[list[str], list[list[str]]]:
        """(headers, rows) of a finished run's table (``gradtail train`` / ``eval``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def headline(self, final: Mapping[str, Any]) -> str:
        """A few words on a finished run's test metrics (one line of ``gradtail bench``'s log)."""
        raise NotImplementedError  # pragma: no cover - interface

    def report(self) -> Any:
        """The task's report writer (``build_results(suite, finals, output, wall_seconds)``,
        ``write_report(results, output)``, ``table(results) -> (headers, rows)``)."""
        raise NotImplementedError  # pragma: no cover - interface

    def predict(self, state: dict[str, Any], checkpoint: Path, request: PredictRequest) -> str:
        """``gradtail predict`` for a checkpoint of this task: the model rebuilt from ``state`` (the
        checkpoint's config and weights, no training data), ``request``'s images or split predicted, the
        task's output format written (to ``request.output``, or returned as text for standard output)."""
        raise NotImplementedError  # pragma: no cover - interface

    def export(self, state: dict[str, Any], checkpoint: Path, request: ExportRequest) -> str:
        """``gradtail export`` for a checkpoint of this task: the model rebuilt from ``state`` (with the
        post-hoc adjustment ``request.posthoc`` folded in where the task takes one) written in
        ``request.format`` with its JSON sidecar; returns a line saying what was written. A task that
        cannot be exported (the default) refuses in one line."""
        raise _config_error(f"task {self.name!r} cannot be exported (gradtail export)")


def _config_error(message: str) -> Exception:
    from gradtail.errors import ConfigError

    return ConfigError(message)


_CLASSIFICATION_STEP = TaskContract(None)  # the step of a StepContext built without a task (tests, docs)

#: The registered tasks, ``name -> TaskContract`` subclass. The task modules (``gradtail.tasks.*``)
#: register themselves; they are imported on the first lookup, so a config naming its task finds it.
TASKS: Registry[TaskContract] = Registry(
    "task", package=("gradtail.tasks", [str(Path(__file__).with_name("tasks"))])
)


def create_task(cfg: Any) -> TaskContract:
    """The task of a run config (``cfg.task``; ``classification`` by default)."""
    return TASKS.get(cfg.task)(cfg)


# --------------------------------------------------------------------------- update rules


@dataclass
class StepOutput:
    """What an update rule returns: the step's loss and logits (``None`` when they stay inside the model),
    detached, plus any scalars to log (floats or 0-d tensors, averaged over the epoch)."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """Everything an update rule may use for one step; built by the trainer.

    ``forward(x)`` runs the model under the run's autocast setting, returns (features, logits) and lets
    observers see the logits; with ``views`` (the batch's extra views, (V * B, C, H, W)) the backbone runs
    once over [x; views], ``forward`` still returns the batch's own (features, logits) and keeps the views'
    features in ``view_features`` for the regularizer. ``regularize(features, logits, targets, loss)`` is
    the active regularizer's term (``None`` when there is none or it has not started);
    ``criterion(features, logits, targets)`` is the base loss plus that term. ``backward(loss)`` is
    scaler-aware (fp16) and accumulates into ``.grad``. The trainer zeroes gradients before the rule and
    calls ``optimizer.step()`` after it.

    ``task_loss(x, targets)`` is the task's loss of a batch (:meth:`TaskContract.train_loss`: through
    ``forward`` and ``criterion`` for classification and segmentation, the detector's own loss terms for
    detection); the default update rule back-propagates it.

    ``model`` is what the step runs (the DDP wrapper under ``torchrun``); :attr:`network` is the model
    itself (``features``, ``classifier``, ``backbone_parameters``).
    """

    model: nn.Module
    loss_fn: nn.Module
    regularizer: Regularizer | None
    epoch: int
    observers: Sequence[StepObserver] = ()
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    scaler: torch.amp.GradScaler | None = None
    views: torch.Tensor | None = None
    view_features: torch.Tensor | None = None
    task: TaskContract | None = None  # how a batch is forwarded; None: the classification task

    @property
    def network(self) -> Any:
        """The model without its DDP wrapper (a :class:`gradtail.models.LongTailClassifier`)."""
        return unwrap_model(self.model)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        inputs = x if self.views is None else torch.cat([x, self.views])
        task = self.task if self.task is not None else _CLASSIFICATION_STEP
        with self.autocast():
            h, z = task.forward(self.model, inputs, batch)
        if self.views is not None:
            self.view_features = h[batch:]
        return h[:batch], z

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, z = self.features_and_logits(x)
        for obs in self.observers:
            obs.observe(z, targets)
        return h, z

    def regularize(
        self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor
    ) -> torch.Tensor | None:
        """The regularizer's term for this step (``loss``: the base loss it is added to), or None."""
        if self.regularizer is None or self.epoch < self.regularizer.start_epoch:
            return None
        with self.autocast():
            if self.regularizer.num_views:
                return self.regularizer(
                    features, logits, targets, loss, self.model, view_features=self.view_features
                )
            return self.regularizer(features, logits, targets, loss, self.model)

    def criterion(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = self.loss_fn(logits, targets)
        term = self.regularize(features, logits, targets, loss)
        return loss if term is None else loss + term

    def task_loss(self, x: Any, targets: Any) -> StepLoss:
        """The task's loss of the batch (``x``, ``targets``)."""
        task = self.task if self.task is not None else _CLASSIFICATION_STEP
        return task.train_loss(self, x, targets)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class TrainingView:
    """The read-only view of a run that :meth:`UpdateRule.on_epoch_start` gets (GBG's grouping pass).

    ``model``: the model itself (unwrapped); ``train_images``: the un-augmented training images as stored
    (uint8, N x C x H x W, on the device), ``None`` for datasets that do not hold them in memory;
    ``train_labels``: their labels; ``normalize`` maps a batch of stored images to model input;
    ``loss_fn``: the training loss; ``class_counts``: training images per class.
    """

    model: nn.Module
    train_images: torch.Tensor | None
    train_labels: torch.Tensor
    num_classes: int
    class_counts: Sequence[int]
    loss_fn: nn.Module
    normalize: Callable[[torch.Tensor], torch.Tensor]


class UpdateRule:
    """Owns how a step's gradient is formed. The default is one forward, one backward.

    Subclasses (SAM, GBG) override :meth:`__call__`; they leave the final gradient in ``.grad`` of the
    parameters and never call ``optimizer.step()`` (the trainer does).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from gradtail.models import create_model
        >>> model = create_model("small_cnn", num_classes=3)
        >>> ctx = StepContext(model=model, loss_fn=nn.CrossEntropyLoss(), regularizer=None, epoch=0)
        >>> out = UpdateRule()(ctx, torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 0]))
        >>> tuple(out.logits.shape), model.classifier.weight.grad is not None
        ((4, 3), True)
    """

    report_note: ClassVar[str | None] = None
    search_space: ClassVar[SearchSpace] = {}  # constructor parameters gradtail tune searches

    def __call__(self, ctx: StepContext, x: Any, targets: Any) -> StepOutput:
        out = ctx.task_loss(x, targets)
        ctx.backward(out.loss)
        return StepOutput(loss=out.loss.detach(), logits=out.logits, extras=dict(out.parts))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def on_epoch_start(self, epoch: int, view: TrainingView) -> None:
        """Work between epochs (GBG's grouping); called before every training epoch."""
        return None

    def epoch_summary(self) -> dict[str, float]:
        """Scalars for the epoch's record (``metrics.jsonl``), read once at the end of each training epoch
        (GBG: the mean weight of each group)."""
        return {}


# --------------------------------------------------------------------------- post-hoc adjusters


class PosthocAdjuster:
    """Fit on validation outputs (never test), then transform test outputs before the argmax.

    - ``input_kind``: ``"logits"`` (default) or ``"features"`` (tau-norm re-weights the head, so it fits
      and transforms backbone features); :meth:`fit` and :meth:`transform` take that kind of input and
      :meth:`transform` returns logits.
    - ``construction_inputs``: what the harness passes at construction besides the config's parameters:
      ``"class_counts"`` (training images per class) and / or ``"classifier"`` (the model's head).
    - :meth:`fitted_params`: the parameters in use after :meth:`fit` (reports print them).
    - :meth:`state_dict` / :meth:`load_state_dict`: everything :meth:`transform` needs after :meth:`fit`
      (a tensor such as tau-norm's head weights, not only the reported scalars). The trainer saves it with
      the run (``extras/posthoc/<name>.pt``); ``gradtail predict --posthoc NAME`` constructs the adjuster
      as the trainer did (config parameters plus ``construction_inputs``) and restores it with
      :meth:`load_state_dict`, without the validation data.
    """

    name: ClassVar[str] = "posthoc"
    input_kind: ClassVar[Literal["logits", "features"]] = "logits"
    construction_inputs: ClassVar[tuple[str, ...]] = ()
    report_note: ClassVar[str | None] = None

    def fit(self, inputs: torch.Tensor, targets: torch.Tensor) -> PosthocAdjuster:  # pragma: no cover
        raise NotImplementedError

    def transform(self, inputs: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def fitted_params(self) -> dict[str, Any]:
        return {}

    def needs_validation(self) -> bool:
        """Whether :meth:`fit` needs the validation split (it tunes on it; the default). An adjuster
        whose parameters are all given returns False and may run on data without a validation split
        (iNaturalist 2018, whose val list is its test set): the trainer then skips :meth:`fit`."""
        return True

    def state_dict(self) -> dict[str, Any] | None:
        """The fitted state :meth:`transform` needs (tensors, numbers, strings: what ``torch.save`` stores
        and ``torch.load(weights_only=True)`` reads), or None (the default) when the adjuster cannot be
        restored: the trainer then saves nothing for it and ``gradtail predict`` does not offer it."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into an adjuster constructed as the trainer did."""
        from gradtail.errors import ConfigError

        raise ConfigError(f"post-hoc adjuster {self.name!r} cannot restore a fitted state")

    def logit_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A fitted ``logits`` adjuster as a per-class affine map of the logits, z -> z * scale + offset
        (``scale``, ``offset``: float64, (C,) or scalars), which ``gradtail export`` folds into the
        classifier's weights and bias; None (the default) when the adjustment is not one."""
        return None

    def feature_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A fitted ``features`` adjuster as a linear head, logits = features @ weight.T + bias (``weight``
        (C, D), ``bias`` (C,) or None), which ``gradtail export`` puts in place of the classifier; None
        (the default) when its transform is not one."""
        return None


# --------------------------------------------------------------------------- data


@runtime_checkable
class TrainLoader(Protocol):
    """The training loader of a run: batches ``(x, y)`` or ``(x, y, views)`` with ``num_views > 0``."""

    num_views: int
    images: torch.Tensor | None  # un-augmented stored images on the device; None when not in memory
    labels: torch.Tensor

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]: ...


@runtime_checkable
class RunData(Protocol):
    """The data of a run as the trainer uses it, whatever the storage (in memory or image files)."""

    @property
    def class_counts(self) -> list[int]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    @property
    def train_labels(self) -> torch.Tensor: ...

    @property
    def class_names(self) -> list[str]: ...

    def preprocessing(self) -> dict[str, Any]:
        """How an image file becomes model input at test time, as plain JSON-able data that checkpoints
        carry (``gradtail predict`` rebuilds the input from it without the training data):

        - ``transform``: ``"in_memory"`` (decode, check or resize to ``size``, zero-pad to ``pad_to``,
          normalise) or ``"imagenet"`` (decode RGB, resize the shorter side to ``resize``, centre-crop to
          ``image_size``, normalise);
        - ``mode``: the PIL mode images are decoded to (``"L"``, ``"RGB"``);
        - ``size``: [H, W] of the stored images (``in_memory``); ``resize_to_size``: whether images of
          another size are resized to it (else they are an error);
        - ``pad_to``: zero-padding target or None; ``image_size`` / ``resize`` (``imagenet``);
        - ``mean``, ``std``: per-channel normalisation.
        """
        ...

    def has_split(self, split: str) -> bool: ...

    def train_loader(
        self, cfg: Any, sampler: Any, device: torch.device, rank: int, world: int
    ) -> TrainLoader: ...

    def eval_loader(
        self, split: str, cfg: Any, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def normalize(self, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


__all__ = [
    "TASKS",
    "Accepts",
    "EvalReport",
    "EvalView",
    "ExportRequest",
    "LossContract",
    "PosthocAdjuster",
    "PredictRequest",
    "Regularizer",
    "RunData",
    "StepContext",
    "StepLoss",
    "StepObserver",
    "StepOutput",
    "TaskContract",
    "TrainLoader",
    "TrainingView",
    "UpdateRule",
    "create_task",
    "unwrap_model",
]
