"""Run a suite: every (method, seed) in order, skipping finished runs and resuming interrupted ones.

Layout: ``<output>/<method>/seed<k>/`` is an ordinary run directory (:class:`gradtail.rundir.RunDirectory`).
A run is *done* when its ``final.json`` exists with the config hash of the run it would be now; a run
with a checkpoint but no ``final.json`` resumes from it (epoch-level, bit-identical on CPU). So killing
``gradtail bench`` at any point and starting it again completes the suite without redoing work.

A run directory that holds a run of *another* config (the suite was edited) is never retrained over
silently: the whole suite is checked before the first run, and such runs are an error unless
``overwrite`` is given (``gradtail bench --overwrite``), which retrains exactly those runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradtail.bench.suite import MethodSpec, Suite
from gradtail.config import RunConfig, read_yaml_mapping
from gradtail.contracts import create_task
from gradtail.errors import ConfigError, OutputError
from gradtail.rundir import CONFIG, RunDirectory, config_changes, describe_changes, unsafe_changes


class SuiteRun:
    """What the runner knows about one planned run: where it lives, whether it is done (its
    ``final.json`` carries the config hash of the run it would be now) and whether its directory holds a
    run of another config. Subclasses give the hash, the config mapping and the resume-safe keys."""

    directory: Path

    @property
    def run_dir(self) -> RunDirectory:
        return RunDirectory(self.directory)

    def config_hash(self) -> str:
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def unsafe(self, changes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return unsafe_changes(changes)

    def is_done(self) -> bool:
        final = self.run_dir.read_final()
        return final is not None and final.get("config_hash") == self.config_hash()

    def conflict(self) -> str | None:
        """Why the directory cannot be resumed as this run (it holds a run of another config), or None."""
        run = self.run_dir
        saved = run.file(CONFIG)
        if self.is_done() or not run.holds_run() or not saved.is_file():
            return None
        unsafe = self.unsafe(config_changes(read_yaml_mapping(saved, "run config"), self.config_dict()))
        return f"its config differs in {describe_changes(unsafe)}" if unsafe else None


def check_conflicts(runs: list[Any], overwrite: bool) -> dict[int, str]:
    """``{id(run): reason}`` of the runs whose directory holds another config's run; an
    :class:`OutputError` naming the first, before any training, unless ``overwrite``."""
    conflicts = {id(r): reason for r in runs if (reason := r.conflict()) is not None}
    if conflicts and not overwrite:
        first = next(r for r in runs if id(r) in conflicts)
        n = len(conflicts)
        what = (
            "1 run directory of this suite holds a run"
            if n == 1
            else f"{n} run directories of this suite hold runs"
        )
        raise OutputError(
            f"{what} of another config (first: {first.directory}: {conflicts[id(first)]}); "
            "rerun with --overwrite to retrain them, or use another --output"
        )
    return conflicts


def collect_finals(runs: list[Any]) -> list[dict[str, Any]]:
    """Every planned run's ``final.json``, with its ``method`` and ``seed``."""
    finals = []
    for r in runs:
        final = r.run_dir.read_final()
        if final is None:
            raise OutputError(f"{r.run_dir.file('final.json')} is missing or unreadable after the run")
        finals.append(final | {"method": r.method.name, "seed": r.seed})
    return finals


@dataclass
class PlannedRun(SuiteRun):
    method: MethodSpec
    seed: int
    directory: Path
    config: RunConfig

    def config_hash(self) -> str:
        return self.config.hash()

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def unsafe(self, changes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return unsafe_changes(changes, create_task(self.config).resume_safe)


def _ordered(methods: list[MethodSpec]) -> list[MethodSpec]:
    """Methods with ``after`` come after the method they start from (depth-first; cycles are errors)."""
    by_name = {m.name: m for m in methods}
    out: list[MethodSpec] = []
    state: dict[str, str] = {}

    def visit(m: MethodSpec) -> None:
        if state.get(m.name) == "done":
            return
        if state.get(m.name) == "visiting":
            raise ConfigError(f"methods form a cycle through 'after': {m.name!r}")
        state[m.name] = "visiting"
        if m.after:
            visit(by_name[m.after])
        state[m.name] = "done"
        out.append(m)

    for m in methods:
        visit(m)
    return out


def plan_runs(suite: Suite, output: Path, only: list[str] | None = None) -> list[PlannedRun]:
    selected = set(only) if only else None
    if selected:
        missing = selected - {m.name for m in suite.methods}
        if missing:
            raise ConfigError(f"--only names unknown method(s) {sorted(missing)}")
        # a selected method needs the methods it starts from
        for m in list(suite.methods):
            if m.name in selected and m.after:
                selected.add(m.after)
    runs = []
    for seed in suite.seeds:
        for m in _ordered(suite.methods):
            if selected is not None and m.name not in selected:
                continue
            cfg = suite.run_config(m, seed)
            directory = output / m.name / f"seed{seed}"
            cfg.train.output_dir = str(directory)
            if m.after:
                cfg.train.init_from = str(output / m.after / f"seed{seed}" / "checkpoints" / "last.pt")
            runs.append(PlannedRun(m, seed, directory, cfg))
    return runs


def _fmt_duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def execute_runs(
    what: str,
    runs: list[Any],
    conflicts: dict[int, str],
    describe: Callable[[Any], str],
    train: Callable[[Any, bool], str],
    log: Callable[[str], None] | None,
    output: Path,
) -> None:
    """The loop every suite runner shares: runs in order, the done ones skipped, the others resumed from
    their checkpoint or (``conflicts``: another config's run) retrained, with an ETA from the runs so far.
    ``describe(run)`` says what a run trains, ``train(run, replace)`` trains it and returns its headline
    metrics for the log. ``log`` defaults to a print flushed per line (the progress must show when stdout
    is a file or a pipe)."""
    if log is None:

        def log(line: str) -> None:
            print(line, flush=True)

    todo = sum(not r.is_done() for r in runs)
    log(f"gradtail bench: {what}: {len(runs)} runs ({len(runs) - todo} already done) -> {output}")
    durations: list[float] = []
    for i, run in enumerate(runs, start=1):
        tag = f"[{i}/{len(runs)}] {run.method.name} seed {run.seed}"
        if run.is_done():
            log(f"{tag}: done, skipped")
            continue
        replace = id(run) in conflicts
        resumed = not replace and run.run_dir.last_checkpoint.is_file()
        remaining = sum(1 for r in runs[i - 1 :] if not r.is_done())
        eta = f", ETA {_fmt_duration(remaining * sum(durations) / len(durations))}" if durations else ""
        doing = "retraining (another config)" if replace else "resuming" if resumed else "training"
        log(f"{tag}: {doing} ({describe(run)}{eta})")
        start = time.perf_counter()
        headline = train(run, replace)
        durations.append(time.perf_counter() - start)
        log(f"{tag}: {headline} ({_fmt_duration(durations[-1])})")


def run_suite(
    suite: Suite,
    output: Path,
    only: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run every planned run that is not done, whatever the suite's task; return the ``final.json`` of
    every planned run.

    Before the first run, every planned directory is checked: one that holds a run of another config is
    an :class:`OutputError` naming it, unless ``overwrite`` (then that run is retrained from scratch).
    """
    from gradtail.engine.trainer import Trainer
    from gradtail.environment import resolve_amp, resolve_device

    runs = plan_runs(suite, output, only)
    conflicts = check_conflicts(runs, overwrite)

    def describe(run: PlannedRun) -> str:
        t = run.config.train
        what = f"{run.config.model.name}, loss {run.config.loss.name}, {run.config.optim.epochs} epochs"
        return f"{what}, {resolve_amp(t.amp, resolve_device(t.device)).describe()}"

    def train(run: PlannedRun, replace: bool) -> str:
        run.config.train.progress = progress and sys.stderr.isatty()
        trainer = Trainer(run.config, output_dir=run.directory, verbose=False)
        return trainer.task.headline(trainer.fit(resume=not replace, overwrite=replace))

    execute_runs(f"suite {suite.name!r}", runs, conflicts, describe, train, log, output)
    return collect_finals(runs)
