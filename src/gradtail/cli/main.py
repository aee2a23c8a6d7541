"""The ``gradtail`` command: ``train``, ``eval``, ``predict``, ``export``, ``bench``, ``report``, ``tune``,
``list``, for every task (the task comes from the config; the commands know it only through its contract),
and ``checkpoint upgrade`` (checkpoints of earlier gradtail versions, on the user's ``--trust``).

Errors gradtail raises on purpose (bad config key, missing data, wrong labels, an output that cannot be
written, a run directory that already holds a run, ...) are printed as one line ``gradtail: error: ...``
with exit status 2, never as a traceback; so are operating-system errors on files (the file named).
``GRADTAIL_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradtail.errors import ConfigError, DataError, GradtailError


def _cmd_train(args: argparse.Namespace) -> int:
    from gradtail.distributed import init_from_environment, shutdown

    init_from_environment()  # under torchrun: one process per device, DDP, every statistic synced
    try:
        return _train(args)
    finally:
        shutdown()


def _train(args: argparse.Namespace) -> int:
    from gradtail.config import load_config
    from gradtail.distributed import is_main_process, world_size
    from gradtail.engine.trainer import Trainer
    from gradtail.report import format_table
    from gradtail.rundir import FINAL, RunDirectory

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    overrides = list(args.set or [])
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.config, overrides)
    if not (args.resume or args.overwrite):
        RunDirectory(cfg.output_path()).refuse_existing_run()  # before the data is loaded
    trainer = Trainer(cfg, verbose=is_main_process())
    say = _main_process_print()
    counts = trainer.data.class_counts
    say(
        f"gradtail: {cfg.task} run {cfg.name!r} -> {trainer.out} (config {cfg.hash()}, data "
        f"{trainer.data.sha256[:12]}, {trainer.data.num_classes} classes, {len(trainer.train_loader)} "
        f"steps/epoch, {world_size()} process(es), {trainer.precision.describe()}), counts {counts}",
        flush=True,
    )
    final = trainer.fit(resume=args.resume or False, stop_after=args.stop_after, overwrite=args.overwrite)
    if "last_epoch" not in final:
        say(f"gradtail: stopped after epoch {trainer.epoch}; resume with --resume")
        return 0
    say()
    if final["last_epoch"] is not None:
        say(format_table(*reversed(trainer.task.final_rows(final, cfg.name))))
    say(f"\ntraining time {final['train_seconds']:.1f}s; results in {trainer.run_dir.file(FINAL)}")
    return 0


def _main_process_print() -> Callable[..., None]:
    """``print`` on the main process, nothing on the others (one copy of the output under torchrun)."""
    from gradtail.distributed import is_main_process

    return print if is_main_process() else (lambda *a, **k: None)


def _load_run(path: Path) -> tuple[dict[str, Any], Any]:
    """A checkpoint and its config (a checkpoint whose config no longer loads is one line naming it)."""
    from gradtail.config import config_from_dict
    from gradtail.rundir import load_checkpoint

    state = load_checkpoint(path)
    try:
        cfg = config_from_dict(state["config"])
    except GradtailError as e:
        raise DataError(f"checkpoint {path}: its config does not load ({e}); train the run again") from None
    return state, cfg


def _cmd_eval(args: argparse.Namespace) -> int:
    from gradtail.config import config_from_dict
    from gradtail.engine.trainer import Trainer
    from gradtail.report import format_table
    from gradtail.rundir import FINAL, RunDirectory

    path = Path(args.checkpoint)
    state, _ = _load_run(path)
    cfg_dict: dict[str, Any] = state["config"]
    if args.posthoc:
        cfg_dict["eval"]["posthoc"] = list(args.posthoc)
    if args.data_dir:
        cfg_dict["data"]["data_dir"] = args.data_dir
    cfg = config_from_dict(cfg_dict)
    cfg.train.progress = False
    out = Path(args.output) if args.output else path.parent.parent / "eval"
    trainer = Trainer(cfg, output_dir=out)
    trainer.load_state(state)
    trainer.best_dir = RunDirectory(path.parent.parent, writer=False)  # the run's validation-selected weights
    if args.split == "val":
        report = trainer.evaluate_split("val")
        if report is None:
            raise ConfigError("the run's data has no val split")
        final = {"name": cfg.name, "task": cfg.task, "split": "val", "config_hash": cfg.hash(),
                 "epochs": trainer.epoch, "last_epoch": report.to_dict()}  # fmt: skip
        trainer.run_dir.write_json(FINAL, final)
    else:
        final = trainer.finish()
    headers, rows = trainer.task.final_rows(final, cfg.name + (" (val)" if args.split == "val" else ""))
    print(format_table(rows, headers))
    if args.json:
        print(json.dumps(final["last_epoch"] if not args.full else final, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from gradtail.contracts import PredictRequest, create_task

    path = Path(args.checkpoint)
    state, cfg = _load_run(path)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    if not args.inputs and args.split is None:
        raise ConfigError("give image files (folders, lists) to predict, or --split val|test of its data")
    request = PredictRequest(
        inputs=tuple(args.inputs), split=args.split, output=args.output, posthoc=args.posthoc,
        top_k=args.top_k, batch_size=args.batch_size, device=args.device, draw=args.draw,
    )  # fmt: skip
    text = create_task(cfg).predict(state, path, request)
    if args.output is None:
        sys.stdout.write(text)
    else:
        print(f"gradtail: {text or 'predictions'} -> {args.output}", file=sys.stderr)
    return 0


def _run_checkpoint(target: str) -> Path:
    """A run directory's last checkpoint, or the checkpoint file given."""
    path = Path(target)
    if path.is_dir():
        from gradtail.rundir import RunDirectory

        checkpoint = RunDirectory(path).last_checkpoint
        if not checkpoint.is_file():
            raise DataError(f"{path} holds no run checkpoint ({checkpoint} is missing)")
        return checkpoint
    return path


def _cmd_export(args: argparse.Namespace) -> int:
    from gradtail.contracts import ExportRequest, create_task

    path = _run_checkpoint(args.run)
    state, cfg = _load_run(path)
    request = ExportRequest(format=args.format, output=args.output, posthoc=args.posthoc)
    print(f"gradtail: {create_task(cfg).export(state, path, request)}")
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from gradtail.engine.checkpoint import upgrade_checkpoint

    if args.output and len(args.paths) > 1:
        raise ConfigError("--output takes one checkpoint; give one PATH, or convert the files in place")
    for path in args.paths:
        output = Path(args.output) if args.output else None
        print(f"gradtail: {upgrade_checkpoint(Path(path), output, trust=args.trust)}")
    return 0


def _suite_report(suite: Any, output: Path, finals: list[dict[str, Any]], wall: float | None) -> str:
    """Write the suite's report (its task's report module); return the results table as text."""
    from gradtail.contracts import TASKS

    report = TASKS.get(suite.task)(None).report()
    results = report.build_results(suite, finals, output, wall)
    paths = report.write_report(results, output)
    table: str = report.table(results)
    return f"{table}\n\nreport: {paths['html']} (also {paths['markdown'].name}, results.json)"


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from gradtail.bench import load_suite, run_suite

    suite = load_suite(args.suite)  # validated completely before any training
    output = Path(args.output) if args.output else Path("runs") / "bench" / suite.name
    if args.seeds:
        suite.seeds = list(args.seeds)
    only = args.only.split(",") if args.only else None
    start = time.perf_counter()
    finals = run_suite(suite, output, only=only, progress=not args.no_progress, overwrite=args.overwrite)
    wall = time.perf_counter() - start
    print()
    print(_suite_report(suite, output, finals, wall))
    print(f"wall time {wall / 60:.1f} min")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """The report of a suite's finished runs, without training anything."""
    from gradtail.bench import load_suite, plan_runs
    from gradtail.bench.runner import collect_finals

    suite = load_suite(args.suite)
    output = Path(args.output) if args.output else Path("runs") / "bench" / suite.name
    if args.seeds:
        suite.seeds = list(args.seeds)
    runs = plan_runs(suite, output, args.only.split(",") if args.only else None)
    missing = [r.directory for r in runs if not r.is_done()]
    if missing:
        raise ConfigError(
            f"{len(missing)} run(s) of suite {suite.name!r} are not finished (first: {missing[0]}); "
            f"train them with gradtail bench {args.suite}"
        )
    print(_suite_report(suite, output, collect_finals(runs), None))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from gradtail.tune import TuneSettings, run_tune

    settings = TuneSettings(
        trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        objective=args.objective,
        mix_weight=args.mix_weight,
        epochs=args.epochs,
        pruner=args.pruner,
        seed=args.seed,
        final_test=not args.no_test,
        overwrite=args.overwrite,
    )
    methods = args.methods.split(",") if args.methods else None
    output = Path(args.output) if args.output else None
    results = run_tune(args.target, settings, output=output, methods=methods)
    for r in results:
        if r.skipped:
            print(f"{r.method}: not tuned ({r.skipped})")
            continue
        best = ", ".join(f"{k}={v}" for k, v in r.best_params.items())
        default = "N/A" if r.default_value is None else f"{100 * r.default_value:.1f}"
        value = "N/A" if r.best_value is None else f"{100 * r.best_value:.1f}"
        print(
            f"{r.method}: validation {r.objective} {default} (default) -> {value} ({best}); {r.best_config}"
        )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from gradtail.contracts import TASKS
    from gradtail.losses import loss_names
    from gradtail.optim import update_rule_names
    from gradtail.posthoc import posthoc_names
    from gradtail.regularizers import regularizer_names

    print("tasks:        ", ", ".join(TASKS.names()))
    print("losses:       ", ", ".join(loss_names()))
    print("regularizers: ", ", ".join(regularizer_names()))
    print("update rules: ", ", ".join(update_rule_names()))
    print("post-hoc:     ", ", ".join(posthoc_names()))
    for name in TASKS.names():
        print(f"\n{name}:")
        for kind, entries in TASKS.get(name).catalog().items():
            print(f"  {kind + ':':12s}", ", ".join(entries) if len(entries) < 12 else "")
            if len(entries) >= 12:
                print("    " + ", ".join(entries))
    return 0


PREDICT_DESCRIPTION = (
    "Predictions of a trained run from its checkpoint alone (no training data), in the format of its task: "
    "classification, top-k classes and probabilities (CSV or JSON; the softmax of the logits as the run's "
    "loss reads them, or after --posthoc); segmentation, one label-map PNG per image (--output DIR); "
    "detection, a COCO / LVIS results file (JSON)."
)


EXPORT_DESCRIPTION = (
    "A trained run's model outside Python: classification and segmentation as ONNX (or TorchScript), "
    "detection as ONNX (the format torchvision's detectors export to). A classification export with "
    "--posthoc NAME outputs the scores gradtail predict --posthoc NAME gives: the fitted adjustment is "
    "folded into the classifier's weights and bias. A JSON sidecar beside the model gives the class names, "
    "the input size and normalisation and the adjustment applied (docs/export.md)."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradtail", description="Gradient-driven long-tailed recognition.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train and evaluate one run from a YAML config")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=0.05"
    )
    t.add_argument("--output", help="output directory (default: train.output_dir)")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from <output>/checkpoints/last.pt (or from CHECKPOINT); the config must be the "
        "checkpoint's except where and how the run executes",
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
    t.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split (and validation, post-hoc)")
    e.add_argument("checkpoint")
    e.add_argument("--posthoc", nargs="*", help="post-hoc adjusters to fit on validation and apply")
    e.add_argument("--data-dir", help="override data.data_dir (where the data files are)")
    e.add_argument(
        "--split", choices=["val", "test"], help="evaluate only this split (default: test, and val alongside)"
    )
    e.add_argument("--output", help="where to write final.json (default: <run>/eval)")
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    e.add_argument("--full", action="store_true", help="with --json: everything, not only the last epoch")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser(
        "predict",
        help="a trained run's predictions from its checkpoint alone, in its task's own format",
        description=PREDICT_DESCRIPTION,
    )
    pr.add_argument("checkpoint", help="a run's checkpoint, e.g. runs/fmnist_lt_ce/checkpoints/last.pt")
    pr.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image files, folders (every image inside, recursively, sorted) or .txt/.csv lists of paths "
        "(one per line, or a 'path' column; relative to the list's folder)",
    )
    pr.add_argument(
        "--split",
        choices=["val", "test"],
        help="predict this split of the run's own data (rebuilt from its config)",
    )
    pr.add_argument("--data-dir", help="with --split: where the run's data files are now (data.data_dir)")
    pr.add_argument(
        "--posthoc",
        metavar="NAME",
        help="classification: apply the post-hoc adjuster the run fitted on validation (its eval.posthoc: "
        "posthoc_la, tau_norm, gala_rebalance; gala_rebalance estimates its class prior from the images "
        "given)",
    )
    pr.add_argument("--top-k", type=int, metavar="K", help="classification: classes per image (default 5)")
    pr.add_argument(
        "--output",
        help="classification: preds.csv or preds.json (the extension picks the format), default CSV on "
        "stdout; "
        "segmentation: a folder for the PNGs; detection: results.json (default stdout)",
    )
    pr.add_argument("--draw", action="store_true", help="detection: also draw the boxes (<output>.png)")
    pr.add_argument(
        "--batch-size", type=int, metavar="N", help="images per forward pass (default: eval.batch_size)"
    )
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser(
        "export",
        help="a trained run's model as ONNX or TorchScript (post-hoc adjustment folded in) + a JSON sidecar",
        description=EXPORT_DESCRIPTION,
    )
    ex.add_argument("run", help="a run directory (its checkpoints/last.pt) or a checkpoint file")
    ex.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                    help="onnx (default; detection: the only one) or torchscript")  # fmt: skip
    ex.add_argument(
        "--posthoc",
        metavar="NAME",
        help="classification: fold in the post-hoc adjuster the run fitted on validation (posthoc_la, "
        "tau_norm, temperature, gala_rebalance with the validation class mass)",
    )
    ex.add_argument(
        "--output", help="the model file (default <run>/export/model.onnx or .pt); the sidecar: <stem>.json"
    )
    ex.set_defaults(func=_cmd_export)

    ck = sub.add_parser("checkpoint", help="checkpoint files: upgrade those of earlier gradtail versions")
    ck_sub = ck.add_subparsers(dest="checkpoint_command", required=True)
    up = ck_sub.add_parser(
        "upgrade",
        help="rewrite checkpoints of earlier gradtail versions as tensors and plain data (needs --trust)",
        description="Checkpoints hold only tensors and plain data and are loaded with weights_only=True; "
        "files written by earlier versions hold pickled objects (NumPy's and Python's RNG states) and are "
        "refused. This command unpickles such a file, which runs whatever code it holds, and writes it "
        "in the current format: run it only on files whose source you trust, with --trust.",
    )
    up.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint files (e.g. checkpoints/*.pt)")
    up.add_argument("--trust", action="store_true", help="unpickle the files: you trust where they come from")
    up.add_argument("--output", help="write the converted checkpoint here (one PATH; default: in place)")
    up.set_defaults(func=_cmd_checkpoint)

    b = sub.add_parser("bench", help="run a suite of methods x seeds and write results.json + report")
    b.add_argument("suite", help="suite YAML (see suites/)")
    b.add_argument("--output", help="output directory (default: runs/bench/<suite name>)")
    b.add_argument("--only", help="comma-separated methods to run (plus those they start from)")
    b.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain runs whose directory holds a run of another config (otherwise an error)",
    )
    b.set_defaults(func=_cmd_bench)

    tu = sub.add_parser(
        "tune",
        help="search hyperparameters on validation only (Optuna), per method of a suite or config",
        description="Search each method's declared hyperparameters with Optuna (TPE, pruning on the "
        "per-epoch validation metric); the test split is never read during the search. Writes "
        "<output>/<method>/"
        "best.yaml (a config gradtail train / bench accept), trials.csv, summary.json and report.html; "
        "then trains the chosen configuration and evaluates the test split once (unless --no-test).",
    )
    tu.add_argument("target", help="a suite YAML (every method, or --methods) or one run config")
    tu.add_argument("--methods", help="comma-separated methods of the suite to tune")
    tu.add_argument("--trials", type=int, default=20, help="finished trials per method (default 20)")
    tu.add_argument("--timeout", type=float, metavar="S", help="stop searching a method after S seconds")
    tu.add_argument(
        "--storage", metavar="URL", help="Optuna storage URL (default sqlite:///<output>/study.db)"
    )
    tu.add_argument("--output", help="output directory (default runs/tune/<suite or config name>)")
    tu.add_argument(
        "--objective",
        help="validation metric to maximise (default: the task's selection metric); classification: "
        "balanced_accuracy, top1, few, mix ((1-w) balanced accuracy + w Few); segmentation: miou, macc, "
        "miou_rare; detection: AP, APr, AP50, APc, APf",
    )
    tu.add_argument("--mix-weight", type=float, default=0.5, metavar="W", help="w of --objective mix")
    tu.add_argument("--epochs", type=int, help="epochs of each trial (default: the method's schedule)")
    tu.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    tu.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    tu.add_argument("--no-test", action="store_true", help="skip the chosen configuration's test run")
    tu.add_argument("--overwrite", action="store_true", help="replace a chosen configuration's test run")
    tu.set_defaults(func=_cmd_tune)

    rp = sub.add_parser("report", help="write a suite's report from its finished runs (trains nothing)")
    rp.add_argument("suite", help="suite YAML (see suites/)")
    rp.add_argument("--output", help="the suite's output directory (default: runs/bench/<suite name>)")
    rp.add_argument("--only", help="comma-separated methods to report")
    rp.add_argument("--seeds", type=int, nargs="+", help="override the suite's seeds")
    rp.set_defaults(func=_cmd_report)

    ls = sub.add_parser(
        "list", help="list the tasks and their datasets, models and losses; the method families"
    )
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GradtailError as e:
        if os.environ.get("GRADTAIL_DEBUG"):
            raise
        print(f"gradtail: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file gradtail reads or writes outside the paths it checks itself
        if os.environ.get("GRADTAIL_DEBUG"):
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"gradtail: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "gradtail: interrupted; the last finished epoch is checkpointed, continue with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
