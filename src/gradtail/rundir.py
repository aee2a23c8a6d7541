"""The run directory: one owner of its layout, of how its files are written, and of the rules for
starting, resuming and overwriting a run. The trainer, the benchmark runner, the report and the CLI all
go through :class:`RunDirectory`.

Layout of ``<run>/``:

=========================  ==========================================================================
``config.yaml``            the resolved config (written when the run starts, before training)
``environment.json``       versions, device, git commit, world size, resolved precision
``subset.json``            the training subset: class counts and the SHA-256 of the kept indices
``metrics.jsonl``          one JSON record per finished epoch
``final.json``             last-epoch test metrics, the validation-selected epoch, post-hoc results,
                           the resumes and the config changes they made
``diagnostics.json``       per-class gradient ratios per epoch
``predictions.png``        a few test images with the run's predictions (the task draws them at the end)
``checkpoints/last.pt``    the newest checkpoint; ``checkpoints/epoch_NNNN.pt`` the kept epoch ones;
                           ``checkpoints/best.pt`` the weights of the validation-selected epoch
``tensorboard/``           TensorBoard event files (``log.tensorboard``)
``tracking.json``          the experiment trackers' ids for this run (``log.mlflow``: the MLflow run)
``export/``                ``gradtail export``'s default output (the model file and its JSON sidecar)
``extras/<name>/``         files a method or a tool adds (per-method extras); ``extras/posthoc/<name>.pt``
                           the post-hoc adjusters fitted at the end of the run
=========================  ==========================================================================

Rules (:meth:`RunDirectory.start`):

- ``new``: refused when the directory already holds a run (any of ``metrics.jsonl``, ``final.json``,
  a checkpoint): the error names ``--resume`` and ``--overwrite``. Nothing is ever replaced silently.
- ``resume``: continue from the newest checkpoint; the config must equal the checkpoint's except in
  :data:`RESUME_SAFE_KEYS` (keys that change neither the trained weights nor the reported numbers);
  changes there are recorded in the run record (:func:`resume_config_changes`).
- ``overwrite``: remove the run's files (the layout above, nothing else) and start again.

Every write is atomic (a temporary file renamed over the target) and every failure to write (read-only
directory, full disk, a path that cannot be created) is an :class:`~gradtail.errors.OutputError` that
names the file, with no ``*.tmp`` left behind and the previous file intact.

Checkpoints hold only tensors and plain data (:func:`plain_data_problem` checks before every write) and
are read with ``torch.load(weights_only=True)``: a file that holds pickled objects (a checkpoint of an
earlier format, or a file crafted to run code) is refused in one line and never executed; ``gradtail
checkpoint upgrade PATH --trust`` converts an earlier format on the user's word
(:func:`gradtail.engine.checkpoint.upgrade_checkpoint`).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch

from gradtail.errors import ConfigError, DataError, OutputError

StartMode = Literal["new", "resume", "overwrite"]

CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
SUBSET = "subset.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
DIAGNOSTICS = "diagnostics.json"
PREDICTIONS = "predictions.png"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
EXTRAS = "extras"
POSTHOC_EXTRAS = "posthoc"  # extras/posthoc/<name>.pt: fitted post-hoc adjusters (gradtail predict)
TENSORBOARD = "tensorboard"  # TensorBoard event files (log.tensorboard)
TRACKING = "tracking.json"  # the experiment trackers' ids of the run (log.mlflow)
EXPORTS = "export"  # gradtail export's default output folder (model.onnx / model.pt + model.json)
RUN_FILES = (CONFIG, ENVIRONMENT, SUBSET, METRICS, FINAL, DIAGNOSTICS, PREDICTIONS, TRACKING)

# The layout of a checkpoint (gradtail.engine.trainer.Trainer.state_dict): 3 = tensors and plain data
# only, read with weights_only=True (2 pickled NumPy's and Python's RNG states as objects).
CHECKPOINT_VERSION = 3
UPGRADE_HINT = "gradtail checkpoint upgrade {path} --trust"

# Config keys a resumed run may change: where and how the run executes and reports progress, never what
# it trains or measures (docs/runs.md). Everything else must equal the checkpoint's config.
RESUME_SAFE_KEYS = frozenset(
    {
        "train.output_dir",
        "train.progress",
        "train.device",
        "train.threads",
        "train.cpu_allocator",
        "train.compile",
        "train.checkpoint_every",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "eval.batch_size",
        "data.data_dir",
        "data.image_root",
        "data.list_dir",
        "data.download",
        "data.num_workers",
        "data.memory_budget_mb",  # where own-data images are held (memory or files), not the batches
        "data.check_files",
        # experiment tracking: where the run's numbers are also sent, never what it trains or measures
        "log.tensorboard",
        "log.mlflow",
        "log.mlflow_uri",
        "log.mlflow_experiment",
    }
)


# --------------------------------------------------------------------------- writing files


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{error.__class__.__name__}: {error}".split("\n")[0]


def make_directory(path: Path) -> None:
    """``mkdir -p`` with an :class:`OutputError` naming the path when it cannot be created."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {path}: {_reason(e)}") from None


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str = "file") -> None:
    """Write ``path`` through ``write(file)`` into ``path.tmp``, then rename it over ``path``.

    A failure (full disk, read-only directory, ...) removes the temporary file, leaves the previous
    ``path`` intact and raises :class:`OutputError` naming the file.
    """
    make_directory(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {what} {path}: {_reason(e)}; the previous file is intact") from None


def write_text(path: Path, text: str, what: str = "file") -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    atomic_write(path, lambda f: f.write(text.encode()), what)


def write_json(path: Path, obj: Any, what: str = "file", indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON to ``path``."""
    write_text(path, json.dumps(obj, indent=indent), what)


# --------------------------------------------------------------------------- checkpoints


class UnsafeCheckpointError(DataError):
    """A checkpoint refused without being executed: it holds pickled objects, or it has an earlier format
    (one line; ``gradtail checkpoint upgrade PATH --trust`` converts a trusted one)."""


_PLAIN_LEAVES = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def plain_data_problem(value: Any, where: str = "checkpoint") -> str | None:
    """None when ``value`` is tensors and plain data only (what ``torch.load(weights_only=True)`` reads
    back: dicts, lists, tuples, numbers, strings, None, dtypes, devices); otherwise where the first other
    object is and its type (a NumPy array, an enum, a custom class: they would need the pickle to run
    code to come back).

    Example:
        >>> import numpy as np
        >>> plain_data_problem({"w": torch.zeros(2), "epoch": 3, "rng": [1, 2]}) is None
        True
        >>> plain_data_problem({"rng": {"numpy": np.zeros(2)}})
        "checkpoint['rng']['numpy'] (a numpy.ndarray)"
    """
    if isinstance(value, torch.Tensor):
        return None
    if type(value) in _PLAIN_LEAVES:
        return None
    if type(value) in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_LEAVES:
                return f"a key of {where} (a {type(key).__module__}.{type(key).__qualname__})"
            problem = plain_data_problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    if type(value) in (list, tuple, set):
        for i, item in enumerate(value):
            problem = plain_data_problem(item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    return f"{where} (a {type(value).__module__}.{type(value).__qualname__})"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename), so a kill or a full disk never leaves
    half a file, and the previous checkpoint stays intact when the write fails. ``state`` must be
    tensors and plain data (:func:`plain_data_problem`; anything else is a ``TypeError`` naming it, a
    programming error: a checkpoint must load with ``weights_only=True``)."""
    problem = plain_data_problem(state)
    if problem is not None:
        raise TypeError(f"cannot checkpoint {problem}: checkpoints hold only tensors and plain data")
    atomic_write(path, lambda f: torch.save(state, f), "checkpoint")


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects a torch file's pickle would construct besides tensors and plain data (read
    from the pickle's opcodes, nothing executed); empty when it cannot tell."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) or corrupt file: the load itself reports it
        return []


def safe_load(path: Path, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, nothing in the file is
    executed. A file that holds pickled objects is a one-line :class:`DataError` naming it and them
    (with the upgrade command for a gradtail checkpoint); a corrupt or foreign file is one line too."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign / unsafe files
        unsafe = _unsafe_globals(path)
        if unsafe or "Unsupported global" in str(e) or "not an allowed global" in str(e):
            named = f" ({', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''})" if unsafe else ""
            hint = (
                "; if it is a checkpoint of an earlier gradtail whose source you trust, convert it with "
                + UPGRADE_HINT.format(path=path)
                if what == "checkpoint"
                else ""
            )
            raise UnsafeCheckpointError(
                f"{what} {path} holds pickled objects{named}; gradtail does not execute code from "
                f"checkpoints{hint}"
            ) from None
        kind = e.__class__.__name__
        raise DataError(f"{what} {path} is corrupt or not a gradtail {what} ({kind})") from None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a gradtail checkpoint with ``weights_only=True`` (:func:`safe_load`); a missing, corrupt or
    foreign file, one that holds pickled objects or one of an earlier format is a one-line
    :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"checkpoint {path} is not a gradtail checkpoint (missing model/config entries)")
    version = state.get("version")
    if isinstance(version, int) and version < CHECKPOINT_VERSION:
        raise UnsafeCheckpointError(
            f"checkpoint {path} has format {version} (this gradtail reads {CHECKPOINT_VERSION}); convert it "
            f"with {UPGRADE_HINT.format(path=path)}"
        )
    return state


# --------------------------------------------------------------------------- config changes on resume


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and key not in ("params", "posthoc_params", "synthetic"):
            yield from _flatten(value, full)
        else:
            yield full, value


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """``{dotted.key: [saved, current]}`` for every key whose value differs between two config mappings
    (``params`` mappings compare whole). Values compare as YAML / JSON hold them: a tuple in a config
    dataclass equals the list that its saved ``config.yaml`` reads back as."""
    old, new = (dict(_flatten(json.loads(json.dumps(d, default=str)))) for d in (saved, current))
    keys = sorted(old.keys() | new.keys())
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def unsafe_changes(
    changes: dict[str, list[Any]], extra_safe: frozenset[str] = frozenset()
) -> dict[str, list[Any]]:
    """The changes outside :data:`RESUME_SAFE_KEYS` and ``extra_safe`` (a task's own resume-safe keys):
    those that would make a resumed run's record false."""
    return {k: v for k, v in changes.items() if k not in RESUME_SAFE_KEYS and k not in extra_safe}


def describe_changes(changes: dict[str, list[Any]], limit: int = 4) -> str:
    """``key: old -> new; ...`` for the first ``limit`` changes."""
    shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(changes.items())[:limit])
    return shown + (f" (and {len(changes) - limit} more)" if len(changes) > limit else "")


def resume_config_changes(
    saved: dict[str, Any], current: dict[str, Any], where: Path, extra_safe: frozenset[str] = frozenset()
) -> dict[str, list[Any]]:
    """The safe changes ``{key: [saved, current]}`` between a checkpoint's config and the config now.

    Raises :class:`ConfigError` naming the keys that differ outside :data:`RESUME_SAFE_KEYS` (a resumed
    run continues the weights trained under the saved config; a different learning rate, number of
    epochs or method would make its record false).
    """
    changes = config_changes(saved, current)
    unsafe = unsafe_changes(changes, extra_safe)
    if unsafe:
        raise ConfigError(
            f"cannot resume {where}: the config differs from the checkpoint's in {describe_changes(unsafe)}; "
            "a resume may change only where and how the run executes (docs/runs.md); train under another "
            "--output or start again with --overwrite"
        )
    return changes


# --------------------------------------------------------------------------- the directory


class RunDirectory:
    """The files of one run (module docstring: layout and rules).

    Args:
        path: the run's directory.
        writer: whether this process writes (rank 0 under DDP); other ranks read only.

    Example:
        >>> import tempfile
        >>> run = RunDirectory(Path(tempfile.mkdtemp()) / "run")
        >>> run.start("new")
        >>> run.append_metrics({"epoch": 1, "train_loss": 0.5})
        >>> run.holds_run(), run.read_metrics()
        (True, [{'epoch': 1, 'train_loss': 0.5}])
        >>> run.start("new")
        Traceback (most recent call last):
        ...
        gradtail.errors.OutputError: ...already holds an unfinished run (1 epoch recorded)...
    """

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # ------------------------------------------------------------------ layout
    def file(self, name: str) -> Path:
        """The path of one of the run's files (:data:`RUN_FILES`)."""
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / BEST_CHECKPOINT

    def save_best(self, weights: dict[str, Any]) -> None:
        """``checkpoints/best.pt``: the weights of the validation-selected epoch so far (rank 0 writes)."""
        if self.writer:
            save_checkpoint(weights, self.best_checkpoint)

    def load_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The weights :meth:`save_best` wrote; a one-line :class:`DataError` when missing or corrupt."""
        path = self.best_checkpoint
        if not path.is_file():
            raise DataError(f"{path} is missing: the validation-selected weights were not kept")
        state = safe_load(path, map_location)
        if not isinstance(state, dict):
            raise DataError(f"checkpoint {path} is not a gradtail checkpoint (no mapping of weights)")
        return dict(state)

    @property
    def tensorboard_dir(self) -> Path:
        """``tensorboard/``: the run's TensorBoard event files (``log.tensorboard``)."""
        return self.path / TENSORBOARD

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoint_dir / f"epoch_{epoch:04d}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        """The kept epoch checkpoints, newest first."""
        return sorted(self.checkpoint_dir.glob("epoch_*.pt"), reverse=True)

    def extras_dir(self, name: str) -> Path:
        """A folder for files that a method or tool adds to the run (created on first use)."""
        path = self.path / EXTRAS / name
        if self.writer:
            make_directory(path)
        return path

    # ------------------------------------------------------------------ fitted post-hoc adjusters
    def posthoc_file(self, name: str) -> Path:
        """``extras/posthoc/<name>.pt``: the post-hoc adjuster ``name`` as fitted at the end of the run."""
        return self.path / EXTRAS / POSTHOC_EXTRAS / f"{name}.pt"

    def saved_posthoc(self) -> list[str]:
        """Names of the fitted post-hoc adjusters the run saved, sorted."""
        return sorted(p.stem for p in (self.path / EXTRAS / POSTHOC_EXTRAS).glob("*.pt"))

    def save_posthoc(self, name: str, state: dict[str, Any]) -> None:
        """Write a fitted adjuster's record atomically (rank 0), for ``gradtail predict --posthoc``."""
        if self.writer:
            problem = plain_data_problem(state, f"post-hoc state {name!r}")
            if problem is not None:
                raise TypeError(f"cannot save {problem}: post-hoc states hold only tensors and plain data")
            atomic_write(self.posthoc_file(name), lambda f: torch.save(state, f), "post-hoc state")

    def load_posthoc(self, name: str) -> dict[str, Any]:
        """The record :meth:`save_posthoc` wrote; a :class:`DataError` listing the saved ones when the run
        has none named ``name``, or naming the file when it is corrupt."""
        path = self.posthoc_file(name)
        if not path.is_file():
            saved = self.saved_posthoc()
            why = " (its config had no eval.posthoc, or it finished before runs saved them)"
            raise DataError(
                f"the run in {self.path} has no fitted post-hoc adjuster {name!r} ({path} is missing); "
                f"available: {', '.join(saved) if saved else 'none' + why}"
            )
        state = safe_load(path, "cpu", "post-hoc state")
        if not isinstance(state, dict) or "state" not in state:
            raise DataError(f"{path} is not a gradtail post-hoc state (no 'state' entry)")
        return state

    # ------------------------------------------------------------------ state
    def holds_run(self) -> bool:
        """Whether a run has written here (epoch records, a final record or a checkpoint)."""
        return (
            self.file(METRICS).is_file()
            or self.file(FINAL).is_file()
            or self.last_checkpoint.is_file()
            or bool(self.epoch_checkpoints())
        )

    def is_finished(self) -> bool:
        return self.file(FINAL).is_file()

    def read_final(self) -> dict[str, Any] | None:
        """``final.json`` as a mapping, or None when missing or unreadable (an interrupted write)."""
        try:
            return json.loads(self.file(FINAL).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(METRICS)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def describe(self) -> str:
        """A few words on what the directory holds, for messages."""
        if self.is_finished():
            final = self.read_final() or {}
            epochs = final.get("epochs")
            return "a finished run" + (f" ({epochs} epochs)" if epochs is not None else "")
        epochs = len(self.read_metrics())
        return f"an unfinished run ({epochs} epoch{'' if epochs == 1 else 's'} recorded)"

    def start(self, mode: StartMode) -> None:
        """Apply the start rules (module docstring) and make sure the directory can be written.

        ``new`` refuses a directory that holds a run; ``overwrite`` removes the run's files first;
        ``resume`` leaves them. The directory is created and probed with a write, so an unwritable
        output fails here, before any training, with an :class:`OutputError`.
        """
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"unknown start mode {mode!r}")
        if mode == "new":
            self.refuse_existing_run()
        if mode == "overwrite" and self.writer:
            self.clear()
        self.ensure_writable()

    def begin(
        self,
        resume: bool | str | Path = False,
        overwrite: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> dict[str, Any] | None:
        """Start a run from a caller's ``resume`` / ``overwrite`` flags (``gradtail train --resume
        [CHECKPOINT]`` / ``--overwrite``): the checkpoint to continue from, or None for a fresh start.

        ``overwrite`` clears the run first; ``resume=True`` loads this directory's last checkpoint (a
        directory without one starts fresh), a path loads that checkpoint; neither refuses a directory
        that holds a run. The caller restores its state from the returned checkpoint.
        """
        if resume and overwrite:
            raise ConfigError("resume and overwrite exclude each other")
        if overwrite:
            self.start("overwrite")
            return None
        if resume:
            path = None if resume is True else Path(resume)
            state = self.load_resume_checkpoint(path, map_location=map_location)
            self.start("new" if state is None else "resume")
            return state
        self.start("new")
        return None

    def ensure_writable(self) -> None:
        """Create the directory and probe it with a write: an :class:`OutputError` when it cannot be
        created or written (read-only, a path through a file), before any work is done."""
        if not self.writer:
            return
        make_directory(self.path)
        probe = self.path / ".write_probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"cannot write into output directory {self.path}: {_reason(e)}") from None

    def refuse_existing_run(self) -> None:
        """The ``new`` rule alone: an :class:`OutputError` when the directory already holds a run (the CLI
        checks it before loading any data)."""
        if self.holds_run():
            raise OutputError(
                f"{self.path} already holds {self.describe()}; continue it with --resume, replace it "
                "with --overwrite, or choose another --output"
            )

    def clear(self) -> None:
        """Remove the run's files (the layout's, nothing else in the directory)."""
        try:
            for name in RUN_FILES:
                self.file(name).unlink(missing_ok=True)
            folders = (self.checkpoint_dir, self.path / EXTRAS, self.tensorboard_dir, self.path / EXPORTS)
            for folder in folders:
                if folder.is_dir():
                    shutil.rmtree(folder)
        except OSError as e:
            raise OutputError(f"cannot remove the previous run in {self.path}: {_reason(e)}") from None

    # ------------------------------------------------------------------ writing
    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            write_text(self.file(name), text, name)

    def write_json(self, name: str, obj: Any, indent: int | None = 2) -> None:
        if self.writer:
            write_json(self.file(name), obj, name, indent)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one epoch's record to ``metrics.jsonl``."""
        if not self.writer:
            return
        path = self.file(METRICS)
        try:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {_reason(e)}") from None

    def rewrite_metrics(self, records: list[dict[str, Any]]) -> None:
        """``metrics.jsonl`` holding exactly ``records`` (after a resume: the checkpoint's epochs)."""
        if self.writer:
            write_text(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in records), METRICS)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, state: dict[str, Any], epoch: int, keep: int) -> None:
        """``last.pt`` and, with ``keep > 0``, ``epoch_NNNN.pt`` (the ``keep`` newest kept)."""
        if not self.writer:
            return
        save_checkpoint(state, self.last_checkpoint)
        if keep > 0:
            save_checkpoint(state, self.epoch_checkpoint(epoch))
            for old in self.epoch_checkpoints()[keep:]:
                old.unlink(missing_ok=True)

    def load_resume_checkpoint(
        self, path: Path | None = None, map_location: str | torch.device = "cpu"
    ) -> dict[str, Any] | None:
        """The checkpoint to resume from: ``path``, or ``last.pt`` (None when the run has none).

        A corrupt ``last.pt`` is a :class:`DataError` that names the newest intact epoch checkpoint to
        resume from instead (``--resume PATH``), or says that none is intact.
        """
        if path is not None:
            return load_checkpoint(path, map_location)
        if not self.last_checkpoint.is_file():
            older = self.epoch_checkpoints()
            if older:
                raise DataError(
                    f"{self.last_checkpoint} is missing; resume from {older[0]} with --resume {older[0]}"
                )
            return None
        try:
            return load_checkpoint(self.last_checkpoint, map_location)
        except UnsafeCheckpointError:
            raise  # never executed; its epoch checkpoints are of the same kind
        except DataError as e:
            for candidate in self.epoch_checkpoints():
                try:
                    state = load_checkpoint(candidate, "cpu")
                except DataError:
                    continue
                raise DataError(
                    f"{e}; {candidate} (epoch {state.get('epoch')}) is intact: resume from it with "
                    f"--resume {candidate}"
                ) from None
            raise DataError(
                f"{e}; no intact epoch checkpoint is kept: start again with --overwrite"
            ) from None


__all__ = [
    "CHECKPOINT_VERSION",
    "RESUME_SAFE_KEYS",
    "RUN_FILES",
    "RunDirectory",
    "StartMode",
    "UnsafeCheckpointError",
    "atomic_write",
    "config_changes",
    "describe_changes",
    "load_checkpoint",
    "make_directory",
    "plain_data_problem",
    "resume_config_changes",
    "safe_load",
    "save_checkpoint",
    "unsafe_changes",
    "write_json",
    "write_text",
]
