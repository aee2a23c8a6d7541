"""Run configuration: typed dataclasses loaded from YAML, with strict keys and ``--set a.b=value`` overrides.

A config file may start with ``extends: base.yaml`` (a path relative to it) and give only what differs.

An unknown key is a :class:`ConfigError` that names the key and lists the valid ones; a value of the
wrong type names the key, the expected type and the value. Method hyperparameters (``loss.params``,
``model.params``, ``regularizer.params``, ``update_rule.params``, ``eval.posthoc_params[name]``,
``data.sampler_params``, ``data.synthetic``) are mappings whose keys are checked against the signature
of the component they go to by :func:`gradtail.engine.components.check_component_params` (the trainer and
``gradtail bench`` call it before any training): a misspelled key is the same kind of error, naming the
full key (``loss.params.tua``) and listing the valid ones; their values reach the constructor as parsed,
which checks them.

Numbers. YAML files and ``--set`` values are read with :class:`ConfigLoader`, PyYAML's safe loader with
Python's (and YAML 1.2's) float syntax: ``1e-2``, ``5E-4``, ``1e6``, ``1.5e+3``, ``.5``, ``1.``,
``1_000.5`` (one ``_`` between digits, as Python allows) are floats everywhere, ``params`` mappings
included (YAML 1.1, PyYAML's default, reads the exponent forms without a point as strings).
Integers keep YAML 1.1 integer syntax (``+3``, ``1_000``), and anything else (``cifar10``, ``1e-2abc``,
``inf``) stays a string. For typed fields:

- a float field takes any finite number (an integer too); ``.inf`` / ``.nan`` are an error;
- an integer field takes an integer, or a float with an integral value up to 2**53 (``epochs: 1e2`` is
  100; ``epochs: 2.5`` is an error);
- values inside ``params`` mappings are passed as parsed (``1e2`` there is the float 100.0).

:func:`dump_config` writes with :class:`ConfigDumper`, which quotes strings that this loader would read
as numbers, so a dumped config reads back equal.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradtail.errors import ConfigError, did_you_mean


@dataclass
class AugmentConfig:
    crop_padding: int = 2  # random crop to the input size after zero-padding this many pixels; 0 = off
    hflip: bool = True
    autoaugment: str | None = None  # batched AutoAugment policy on uint8 images after crop/flip ("cifar10")
    autoaugment_fill: int = 0  # fill of pixels moved in by AutoAugment's geometric ops (PIL ports: 128)
    cutout: int = 0  # Cutout hole side in pixels, after AutoAugment and before normalisation; 0 = off
    mean: list[float] | None = None  # per-channel; None = the dataset's standard statistics
    std: list[float] | None = None
    # Extra SimCLR-style views per training image for contrastive terms (BCL, docs/methods/gbg.md §3);
    # 0 = none.
    views: int = 0
    view_crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    view_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])  # b, c, s, hue
    view_jitter_p: float = 0.8
    view_grayscale_p: float = 0.2


@dataclass
class LongTailOptions:
    """``data.longtail`` of own data (image_folder, image_csv, npz): a long-tailed training subset of
    balanced data by the LDAM rule of the built-in datasets (their ``data.imbalance_factor`` /
    ``data.profile``); off while ``imbalance_factor`` is None (the data is used as it is)."""

    imbalance_factor: float | None = None  # n_max / n_min of the subset (>= 1); None = no subsampling
    profile: str | None = None  # exp | step (docs/methods/protocol.md §1); None = exp


@dataclass
class SplitFractions:
    """``data.split_fractions`` of own data: the stratified, seeded (``data.subset_seed``) share of each
    class held out for a split the data does not have (gradtail.data.own_data)."""

    # validation share of each class's training images when the data has no val split and no
    # data.longtail (whose validation is data.val_per_class); None = 0.1; 0 = no validation split
    val: float | None = None
    test: float | None = None  # test share of each class, required when the data has no test split


@dataclass
class DataConfig:
    # classification: fashion_mnist | cifar10 | cifar100 | synthetic (in memory); imagenet_lt | places_lt |
    # inat2018 (lists); own data: image_folder | image_csv | npz (gradtail.data.own_data). Other tasks name
    # their own (gradtail list): segmentation fashion_mnist_seg | ade20k | seg_folders, detection
    # fm_detection | coco_files. Each task reads only some of the keys below (its data_keys).
    dataset: str = "fashion_mnist"
    # the built-in datasets' folder; own data: the image folder tree, the CSV folder (or one .csv file),
    # the .npz file (or a folder holding exactly one)
    data_dir: str | None = None
    download: bool = True
    imbalance_factor: float = 100.0
    profile: str = "exp"  # exp | step (docs/methods/protocol.md §1)
    n_max: int | None = None  # head-class count; None = the largest class pool
    subset_seed: int = 0  # seed of the LDAM-rule subset (separate from the training seed)
    val_per_class: int = 20  # held-out balanced validation carved before subsampling; 0 = none
    class_order: list[int] | None = None
    # instance | class_balanced | sqrt | power | progressive; detection: uniform | repeat_factor
    sampler: str = "instance"
    sampler_params: dict[str, Any] = field(default_factory=dict)
    pad_to: int | None = None  # zero-pad images to this size (e.g. 32 for Fashion-MNIST in a CIFAR model)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of the synthetic dataset (tests)
    # Image-list datasets (split files with `relative/path label` lines; docs/methods/protocol.md §2):
    image_root: str | None = None  # root the listed paths are relative to (default: data_dir)
    list_dir: str | None = None  # where the list files are (default: image_root)
    image_size: int = 224  # RandomResizedCrop (train) / CenterCrop (test) size
    color_jitter: float = 0.0  # train-time ColorJitter strength (0 = off)
    num_workers: int = 8  # decoding processes per loader
    check_files: bool = True  # stat every listed image before training (errors name the list line)
    # Own data (image_folder | image_csv | npz; gradtail.data.own_data). The built-in keys above apply as
    # follows: imbalance_factor / profile must stay at their defaults (use longtail); val_per_class,
    # n_max and class_order apply with longtail only; subset_seed seeds every split; image_root is the
    # root of the CSV paths (default: the CSV's folder); check_files reads every image header up front;
    # num_workers decodes images that do not fit memory_budget_mb.
    longtail: LongTailOptions = field(default_factory=LongTailOptions)
    split_fractions: SplitFractions = field(default_factory=SplitFractions)
    class_list: str | None = None  # file of class names, one a line, in label order (relative: data_dir)
    resize: int | list[int] | None = None  # resize every image to [H, W] (an int: square); None = as stored
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); None = 1 when every image is grayscale, else 3
    # decoded images (uint8, all splits) up to this size are held in memory, larger data is decoded from
    # the files by data.num_workers processes; None = 2048 MiB
    memory_budget_mb: float | None = None


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    head: str = "linear"  # linear | cosine
    head_scale: float = 16.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "ce"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ComponentConfig:
    """An optional named component (regularizer, update rule) with free-form parameters."""

    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 200
    warmup_epochs: float = 5.0
    # step | cosine | constant (progress in epochs, warm-up from 0 over warmup_epochs, the LDAM recipe's) |
    # multistep (iteration-based, mmdetection's step policy, the LVIS recipes': linear warm-up over
    # warmup_iters from warmup_ratio x lr, then lr x step_gamma at each of step_fractions of the run)
    schedule: str = "step"
    milestones: list[int] = field(default_factory=lambda: [160, 180])
    milestone_factors: list[float] = field(default_factory=lambda: [0.01, 0.0001])  # absolute multipliers
    min_lr: float = 0.0  # cosine floor
    warmup_iters: int = 0  # multistep only
    warmup_ratio: float = 0.001  # multistep only
    step_fractions: list[float] = field(default_factory=lambda: [0.67, 0.92])  # multistep only
    step_gamma: float = 0.1  # multistep only
    drop_last: bool = False
    grad_clip: float | None = None  # clip the gradient norm of the parameters to this before each step
    # split each batch into this many micro-batches, backward one at a time, one optimizer step (memory):
    # the losses see the statistics of before the step and normalise by the whole batch (docs/losses.md)
    accumulation_steps: int = 1


AMP_SETTINGS = ("auto", "none", "bf16", "fp16")
CPU_ALLOCATOR_SETTINGS = ("auto", "system")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bfloat16 autocast where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 /
    # AMX), float32 elsewhere (gradtail.environment.resolve_amp) | none | bf16 | fp16 (CUDA)
    amp: str = "auto"
    # auto: on a CPU run under glibc, freed tensor memory stays in the process heap instead of being handed
    # back to the OS after every step (gradtail.environment.configure_cpu_allocator) | system
    cpu_allocator: str = "auto"
    channels_last: bool = False
    compile: bool = False
    eval_every: int = 1  # evaluate validation every N epochs (and the last); test once, after the last
    checkpoint_every: int = 1
    # also checkpoint every N training steps inside an epoch (last.pt: sampler position, RNG, statistics,
    # scaler, partial epoch sums); a run killed mid-epoch resumes there, bit-identically; 0 = epoch ends only
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 1  # how many epoch checkpoints to keep besides last.pt
    output_dir: str = "runs/{name}"
    progress: bool = True
    diagnostics: bool = True  # per-class gradient-ratio observer (docs/methods/eql.md §6)
    threads: int | None = None  # torch.set_num_threads; None = leave PyTorch's default
    # Decoupled training (cRT, Kang et al. 2020): start from a stage-1 checkpoint's model, optionally
    # freeze the backbone (its BatchNorm statistics too) and re-initialise the classifier.
    # Under torchrun on GPUs: BatchNorm statistics over the global batch (PyTorch's SyncBatchNorm is
    # GPU-only; on CPU this setting is a configuration error).
    sync_batchnorm: bool = False
    init_from: str | None = None
    freeze_backbone: bool = False
    reset_classifier: bool = False


@dataclass
class EvalConfig:
    # Many: > many_threshold training images, Few: < few_threshold, Medium: the rest (both ends inclusive).
    # Both null (the default): the protocol's 100 / 20 when they leave no group empty, else terciles of the
    # class counts (gradtail.metrics.resolve_shot_groups); final.json records the rule ("groups").
    many_threshold: int | None = None
    few_threshold: int | None = None
    ece_bins: int = 15
    posthoc: list[str] = field(default_factory=list)  # post-hoc adjusters fit on validation logits
    posthoc_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 1000
    # Validation is evaluated every train.eval_every epochs (and at the last) and selects the epoch; the
    # test split once, after the last epoch. test_curve: also evaluate the test split with every
    # validation (a curve for plots, marked in the report as never used for selection).
    test_curve: bool = False


@dataclass
class LogConfig:
    """``log:``: experiment trackers that also receive a run's numbers (off by default; optional extras,
    ``pip install 'gradtail[track]'``; :mod:`gradtail.tracking`). What a run trains and measures never
    depends on them (the keys are resume-safe and out of the config hash)."""

    tensorboard: bool = False  # TensorBoard event files in <run>/tensorboard/
    mlflow: bool = False  # one MLflow run per training run (rank 0)
    # MLflow tracking URI: None = a local file store, ./mlruns (file:<cwd>/mlruns); any URI MLflow takes
    # (sqlite:///mlflow.db, http://host:5000, databricks, ...)
    mlflow_uri: str | None = None
    mlflow_experiment: str = "gradtail"  # the MLflow experiment runs are logged under


@dataclass
class RunConfig:
    """A run: its ``task`` (a registered :class:`~gradtail.contracts.TaskContract`, classification by
    default), the sections every task shares, and ``options``: the task's own section, a dataclass the
    task declares, written under the task's name (``detection: {...}``, ``segmentation: {...}``)."""

    name: str = "run"
    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    regularizer: ComponentConfig = field(default_factory=ComponentConfig)
    update_rule: ComponentConfig = field(default_factory=lambda: ComponentConfig(name="plain"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    options: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data: the shared sections, then the task's section under its name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        if self.options is not None:
            d[self.task] = dataclasses.asdict(self.options)
        return copy.deepcopy(d)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the resolved config (output paths and the trackers of
        ``log`` excluded)."""
        d = self.to_dict()
        d.pop("log", None)
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("output_dir", "progress")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def output_path(self) -> Path:
        return Path(self.train.output_dir.format(name=self.name))


# --------------------------------------------------------------------------- YAML with Python floats

_FLOAT_TAG = "tag:yaml.org,2002:float"
_DIGITS = r"[0-9](?:_?[0-9])*"  # digits with single underscores between them, as Python's float() takes
# A float: Python's float() syntax for finite numbers with a point or an exponent (a plain integer stays
# an int), or YAML's .inf / .nan spellings. Replaces YAML 1.1's pattern, which needs a point (``1.0e-2``).
_FLOAT_PATTERN = re.compile(
    rf"""^[-+]?(?:{_DIGITS}\.(?:{_DIGITS})?(?:[eE][-+]?{_DIGITS})?
            |\.{_DIGITS}(?:[eE][-+]?{_DIGITS})?
            |{_DIGITS}[eE][-+]?{_DIGITS}
            |\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_MAX_EXACT_INT = 2**53  # floats above this are not exact integers


def _with_python_floats(
    resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]],
) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    """A copy of a PyYAML implicit-resolver table with the float pattern replaced (same precedence)."""
    return {
        first: [(tag, _FLOAT_PATTERN if tag == _FLOAT_TAG else regexp) for tag, regexp in entries]
        for first, entries in resolvers.items()
    }


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as Python does: ``1e-2``, ``5E-4``, ``1e6``, ``.5`` are floats
    (plain YAML 1.1 reads exponents without a point as strings); integers and strings are unchanged."""

    yaml_implicit_resolvers = _with_python_floats(yaml.SafeLoader.yaml_implicit_resolvers)


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with :class:`ConfigLoader`'s resolvers: a string that reads as a float there
    (``"1e-2"``) is written quoted, so dumped configs read back equal."""

    yaml_implicit_resolvers = _with_python_floats(yaml.SafeDumper.yaml_implicit_resolvers)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader` (safe: plain data only). Raises ``yaml.YAMLError`` or
    ``ValueError`` (a scalar that matches a pattern but does not construct, e.g. a date 2020-13-45)."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader subclass: plain data only


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (ints accepted for floats); errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping of settings, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite_float(value, key)
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
            return int(value)  # `epochs: 1e2` is 100
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def _finite_float(value: int | float, key: str) -> float:
    """``value`` as a finite float; infinities, NaN and integers beyond the float range name ``key``."""
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"config key {key!r}: {value!r} is too large for a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
    return number


def _from_dict(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = did_you_mean(key, names, " (")
            raise ConfigError(
                f"unknown config key {full!r}{hint}{')' if hint else ''}; valid keys"
                f"{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


SHARED_SECTIONS = ("name", "task", "data", "model", "loss", "regularizer", "update_rule", "optim", "train",
                   "eval", "log")  # fmt: skip


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A typed :class:`RunConfig` from a raw mapping (what :func:`load_config_dict` returns).

    The task named by ``task`` (``classification`` when absent; :data:`gradtail.contracts.TASKS`) gives
    the defaults its runs start from (merged under ``data``), the dataclass of its own section (the key
    named like the task), and the ``data.*`` keys its data builders read: a key of another task's
    section, an unknown key anywhere, a value of the wrong type, or a ``data`` key the task does not read
    set away from its default is a one-line :class:`ConfigError` naming the key and the valid ones.
    """
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of settings at the top level")
    from gradtail.contracts import TASKS

    task_name = data.get("task", "classification")
    if not isinstance(task_name, str):
        raise ConfigError(f"config key 'task': expected a task name, got {task_name!r}")
    task = TASKS.get(task_name)
    merged = deep_merge(copy.deepcopy(dict(task.defaults)), data)
    merged["task"] = task_name
    section = merged.pop(task_name, None) if task.options is not None else None
    unknown = sorted(set(merged) - set(SHARED_SECTIONS))
    if unknown:
        valid = [*SHARED_SECTIONS, *([task_name] if task.options is not None else [])]
        hint = did_you_mean(unknown[0], valid, " (")
        raise ConfigError(
            f"unknown config key {unknown[0]!r} for task {task_name!r}{hint}{')' if hint else ''}; "
            f"valid keys: {', '.join(valid)}"
        )
    cfg = _from_dict(RunConfig, merged)
    if task.options is not None:
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"config key {task_name!r}: expected a mapping of settings, got {section!r}")
        cfg.options = _from_dict(task.options, section or {}, task_name)
    _check_data_keys(cfg, task.data_keys, task_name)
    validate_config(cfg)
    return cfg


def _check_data_keys(cfg: RunConfig, keys: Any, task: str) -> None:
    """A ``data.*`` key set away from its default that the task's data builders never read is an error
    (it would be silently ignored)."""
    if keys is None:
        return
    default = DataConfig()
    for f in dataclasses.fields(DataConfig):
        if f.name not in keys and getattr(cfg.data, f.name) != getattr(default, f.name):
            raise ConfigError(
                f"config key 'data.{f.name}' is not read by task {task!r}; its data keys: "
                f"{', '.join(sorted(keys))}"
            )


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like a.b=value")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else None
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML by :class:`ConfigLoader`, so ``1e-2`` is a
    float) to a raw config mapping."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` in place: sections merge key by key; ``params`` mappings and all
    other values are replaced whole (a method's hyperparameters never mix with another's)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "params":
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def read_yaml_mapping(path: Path, what: str, where: str = "") -> dict[str, Any]:
    """The mapping at the top of a YAML file (read with :class:`ConfigLoader`); a missing file, invalid
    YAML or a non-mapping is a :class:`ConfigError` naming ``what`` and the path."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}{where}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings")
    return data


def load_config_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a config file, with ``extends: other.yaml`` (relative to the file) resolved:
    the extended file's settings first, this file's merged on top. ``name`` defaults to the file stem."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(
            f"config files extend each other in a cycle: {' -> '.join(map(str, (*_seen, path)))}"
        )
    where = f" (extended by {_seen[-1]})" if _seen else ""
    data = read_yaml_mapping(path, "config file", where)
    parent = data.pop("extends", None)
    if parent is not None:
        base = load_config_dict(path.parent / str(parent), (*_seen, path))
        base.pop("name", None)
        data = deep_merge(base, data)
    data.setdefault("name", path.stem)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return config_from_dict(apply_overrides(load_config_dict(path), overrides or []))


def validate_config(cfg: RunConfig) -> None:
    """Checks across keys that the dataclass types cannot express."""
    o, t, d = cfg.optim, cfg.train, cfg.data
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if len(o.milestones) != len(o.milestone_factors):
        raise ConfigError("optim.milestones and optim.milestone_factors must have the same length")
    if o.epochs < 1 or o.batch_size < 1 or o.lr <= 0:
        raise ConfigError("optim.epochs, optim.batch_size and optim.lr must be positive")
    if o.warmup_epochs < 0 or o.warmup_epochs > o.epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, epochs], got {o.warmup_epochs}")
    if t.amp not in AMP_SETTINGS:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_SETTINGS)}, got {t.amp!r}")
    if t.cpu_allocator not in CPU_ALLOCATOR_SETTINGS:
        raise ConfigError(
            f"train.cpu_allocator must be one of {', '.join(CPU_ALLOCATOR_SETTINGS)}, got {t.cpu_allocator!r}"
        )
    if d.profile not in ("exp", "step"):
        raise ConfigError(f"data.profile must be exp or step, got {d.profile!r}")
    if d.imbalance_factor < 1:
        raise ConfigError(f"data.imbalance_factor must be >= 1, got {d.imbalance_factor}")
    many, few = cfg.eval.many_threshold, cfg.eval.few_threshold
    if (many is None) != (few is None):
        raise ConfigError(
            "eval.many_threshold and eval.few_threshold are set together: both numbers, or both null "
            f"(the protocol's 100 / 20 when no group is empty, else terciles); got {many} and {few}"
        )
    if many is not None and few is not None and few > many:
        raise ConfigError("eval.few_threshold must be <= eval.many_threshold")
    if t.eval_every < 1 or t.checkpoint_every < 1:
        raise ConfigError("train.eval_every and train.checkpoint_every must be >= 1")
    if t.checkpoint_every_steps < 0:
        raise ConfigError(f"train.checkpoint_every_steps must be >= 0, got {t.checkpoint_every_steps}")
    _validate_schedule(o)
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip must be positive (or null), got {o.grad_clip}")
    if o.accumulation_steps < 1:
        raise ConfigError(f"optim.accumulation_steps must be >= 1, got {o.accumulation_steps}")


SCHEDULES = ("step", "cosine", "constant", "multistep")
_MULTISTEP_KEYS = ("warmup_iters", "warmup_ratio", "step_fractions", "step_gamma")


def _validate_schedule(o: OptimConfig) -> None:
    default = OptimConfig()
    if o.schedule != "multistep":
        for key in _MULTISTEP_KEYS:
            if getattr(o, key) != getattr(default, key):
                raise ConfigError(
                    f"config key 'optim.{key}' belongs to the multistep schedule (optim.schedule is "
                    f"{o.schedule!r})"
                )
        return
    if o.warmup_epochs != 0:
        raise ConfigError("optim.schedule multistep warms up over optim.warmup_iters; set warmup_epochs: 0")
    if o.warmup_iters < 0 or not 0 < o.warmup_ratio <= 1:
        raise ConfigError("optim.warmup_iters must be >= 0 and optim.warmup_ratio in (0, 1]")
    if any(not 0 < f < 1 for f in o.step_fractions) or sorted(o.step_fractions) != o.step_fractions:
        raise ConfigError(f"optim.step_fractions must rise within (0, 1), got {o.step_fractions}")
    if not 0 < o.step_gamma <= 1:
        raise ConfigError(f"optim.step_gamma must be in (0, 1], got {o.step_gamma}")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.dump(cfg.to_dict(), Dumper=ConfigDumper, sort_keys=False)
