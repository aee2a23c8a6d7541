"""The ``gradtail`` command: ``train``, ``eval``, ``predict``, ``bench``, ``list``.

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

from gradtail.errors import ConfigError, GradtailError


def _cmd_train(args: argparse.Namespace) -> int:
    from gradtail.distributed import init_from_environment, shutdown

    init_from_environment()  # under torchrun: one process per device, DDP, every statistic synced
    try:
        return _train(args)
    finally:
        shutdown()


def _train(args: argparse.Namespace) -> int:
    from gradtail.config import config_task, load_config
    from gradtail.distributed import is_main_process, world_size
    from gradtail.engine.trainer import Trainer
    from gradtail.report import columns_for, format_table, run_rows
    from gradtail.rundir import FINAL, RunDirectory

    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if config_task(args.config) == "detection":
        return _train_detection(args)

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
        f"gradtail: run {cfg.name!r} -> {trainer.out} (config {cfg.hash()}, "
        f"subset {trainer.data.sha256[:12]}, {sum(counts)} train images, {world_size()} process(es), "
        f"{trainer.precision.describe()}), counts {counts}",
        flush=True,
    )
    final = trainer.fit(resume=args.resume or False, stop_after=args.stop_after, overwrite=args.overwrite)
    if "last_epoch" not in final:
        say(f"gradtail: stopped after epoch {trainer.epoch}; resume with --resume")
        return 0
    say()
    say(format_table(run_rows(final, cfg.name), columns_for(final)))
    say(f"\ntraining time {final['train_seconds']:.1f}s; results in {trainer.run_dir.file(FINAL)}")
    return 0


def _main_process_print() -> Callable[..., None]:
    """``print`` on the main process, nothing on the others (one copy of the output under torchrun)."""
    from gradtail.distributed import is_main_process

    return print if is_main_process() else (lambda *a, **k: None)


def _train_detection(args: argparse.Namespace) -> int:
    """``gradtail train`` of a detection config (docs/detection.md): its own loop around a torchvision
    detector, in a run directory with the same refuse / resume / overwrite rules."""
    from gradtail.detection.training import DetectionRun, load_detection_config
    from gradtail.distributed import is_main_process
    from gradtail.rundir import FINAL, RunDirectory

    cfg = load_detection_config(args.config, sets=args.set)
    cfg.detector.check()
    out = Path(args.output) if args.output else Path("runs") / cfg.name
    if not (args.resume or args.overwrite):
        RunDirectory(out).refuse_existing_run()  # before the data is built
    run = DetectionRun(cfg, out, verbose=is_main_process())
    say = _main_process_print()
    spec = cfg.detector
    say(
        f"gradtail: detection run {cfg.name!r} -> {out} ({spec.arch}, loss {spec.loss}, "
        f"{len(run.train_set)} train images, {run.splits.train.num_classes} classes, "
        f"{cfg.train.epochs} epochs x {run.per_epoch} iterations)",
        flush=True,
    )
    record = run.fit(resume=args.resume or False, overwrite=args.overwrite, stop_after=args.stop_after)
    if "metrics" not in record:
        say(f"gradtail: stopped after epoch {run.epoch}; resume with --resume")
        return 0
    say(_detection_table([(cfg.name, record)]))
    say(f"\ntraining time {record['train_seconds']:.1f}s; results in {run.run_dir.file(FINAL)}")
    return 0


def _detection_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    from gradtail.report import format_table

    keys = ("AP", "AP50", "APr", "APc", "APf")

    def cell(v: float) -> str:
        return "N/A" if v != v else f"{100 * v:.1f}"  # NaN: no ground truth in that group

    body = [[name, *(cell(r["metrics"][k]) for k in keys)] for name, r in rows]
    return format_table(body, ["run", *keys])


def _eval_detection(args: argparse.Namespace, path: Path) -> int:
    from gradtail.detection.training import evaluate_checkpoint

    if args.posthoc:
        raise ConfigError("--posthoc adjusters fit classification logits; not for a detection checkpoint")
    out = Path(args.output) if args.output else path.parent.parent / "eval"
    over: dict[str, Any] = {}
    if args.split:
        over["eval_split"] = args.split
    if args.data_dir:
        over["image_root"] = args.data_dir
    record = evaluate_checkpoint(path, out, over or None)
    print(_detection_table([(record["name"], record)]))
    if args.json:
        print(json.dumps(record if args.full else record["metrics"], indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from gradtail.config import config_from_dict
    from gradtail.engine.trainer import Trainer
    from gradtail.report import columns_for, format_table, run_rows
    from gradtail.rundir import load_checkpoint

    path = Path(args.checkpoint)
    state = load_checkpoint(path)
    if state.get("task") == "detection":
        return _eval_detection(args, path)
    if args.split:
        raise ConfigError("--split is for detection checkpoints (classification evaluates val and test)")
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
    final = trainer.finish()
    print(format_table(run_rows(final, cfg.name), columns_for(final)))
    if args.json:
        print(json.dumps(final["last_epoch"] if not args.full else final, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from gradtail.data.preprocess import collect_image_paths
    from gradtail.predict import Predictor, output_format
    from gradtail.rundir import RunDirectory, write_text

    fmt = output_format(args.output)  # a wrong extension fails before any work
    predictor = Predictor.from_checkpoint(
        args.checkpoint, posthoc=args.posthoc, device=args.device, batch_size=args.batch_size
    )
    c = predictor.num_classes
    k = args.top_k if args.top_k is not None else min(5, c)
    if not 1 <= k <= c:
        raise ConfigError(f"--top-k {k}: the model has {c} classes (give 1 to {c})")
    out = Path(args.output) if args.output else None
    if out is not None:  # an output that cannot be written fails before the images are read
        RunDirectory(out.parent).ensure_writable()
    paths = collect_image_paths(args.inputs)
    result = predictor.predict(paths)
    text = result.to_csv(k) if fmt == "csv" else result.to_json(k, predictor.describe())
    if out is None:
        sys.stdout.write(text)
    else:
        write_text(out, text, "predictions")
        print(f"gradtail: {len(paths)} image(s) -> {out}", file=sys.stderr)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from gradtail.bench import load_suite, run_suite
    from gradtail.bench.detection import suite_task
    from gradtail.report.render import build_results, write_report

    if suite_task(args.suite) == "detection" or _has_detection_methods(args.suite):
        return _bench_detection(args)
    suite = load_suite(args.suite)  # validated completely before any training
    output = Path(args.output) if args.output else Path("runs") / "bench" / suite.name
    if args.seeds:
        suite.seeds = list(args.seeds)
    only = args.only.split(",") if args.only else None
    start = time.perf_counter()
    finals = run_suite(suite, output, only=only, progress=not args.no_progress, overwrite=args.overwrite)
    wall = time.perf_counter() - start
    results = build_results(suite, finals, output, wall)
    paths = write_report(results, output)
    from gradtail.report.aggregate import METRICS, display_label, format_mean_std

    metrics = results.get("metrics", METRICS)  # segmentation suites: mIoU and its groups
    rows = [[display_label(r), *(format_mean_std(r[m]) for m in metrics)] for r in results["table"]]
    from gradtail.report import format_table
    from gradtail.report.table import COLUMNS

    print()
    print(format_table(rows, results.get("columns", COLUMNS)))
    print(
        f"\nwall time {wall / 60:.1f} min; report: {paths['html']} "
        f"(also {paths['markdown'].name}, results.json)"
    )
    return 0


def _has_detection_methods(path: str) -> bool:
    """A suite without ``task`` whose methods are detection configs (``method: config.yaml``)."""
    from gradtail.config import config_task, read_yaml_mapping

    suite = Path(path)
    methods = read_yaml_mapping(suite, "suite file").get("methods")
    if not isinstance(methods, dict) or not methods:
        return False
    first = next(iter(methods.values()))
    ref = first if isinstance(first, str) else first.get("config") if isinstance(first, dict) else None
    return ref is not None and config_task(suite.parent / str(ref)) == "detection"


def _bench_detection(args: argparse.Namespace) -> int:
    import time

    from gradtail.bench.detection import load_detection_suite, run_detection_suite
    from gradtail.report import detection as report
    from gradtail.report.aggregate import format_mean_std
    from gradtail.report.table import format_table

    suite = load_detection_suite(args.suite)  # every method's config built and checked first
    output = Path(args.output) if args.output else Path("runs") / "bench" / suite.name
    if args.seeds:
        suite.seeds = list(args.seeds)
    only = args.only.split(",") if args.only else None
    start = time.perf_counter()
    finals = run_detection_suite(suite, output, only=only, overwrite=args.overwrite)
    wall = time.perf_counter() - start
    results = report.build_results(suite, finals, output, wall)
    paths = report.write_report(results, output)
    rows = [[r["label"], *(format_mean_std(r[m]) for m in report.METRICS)] for r in results["table"]]
    print()
    print(format_table(rows, list(report.HEADERS)))
    print(
        f"\nwall time {wall / 60:.1f} min; report: {paths['html']} "
        f"(also {paths['markdown'].name}, results.json)"
    )
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
    from gradtail.data.builder import DATASETS
    from gradtail.losses import loss_names
    from gradtail.models import model_name_patterns, model_names
    from gradtail.optim import update_rule_names
    from gradtail.posthoc import posthoc_names
    from gradtail.regularizers import regularizer_names

    print("datasets:     ", ", ".join(DATASETS.names()))
    print("models:       ", ", ".join(model_names()))
    for pattern in model_name_patterns():
        print("              ", pattern)
    print("losses:       ", ", ".join(loss_names()))
    print("regularizers: ", ", ".join(regularizer_names()))
    print("update rules: ", ", ".join(update_rule_names()))
    print("post-hoc:     ", ", ".join(posthoc_names()))
    from gradtail.models.detection.heads import ONE_STAGE_LOSSES, TWO_STAGE_LOSSES

    print(
        "detection:     faster_rcnn (losses " + ", ".join(TWO_STAGE_LOSSES) + "); retinanet, fcos (losses "
        + ", ".join(ONE_STAGE_LOSSES) + ")"
    )  # fmt: skip
    return 0


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
    t.add_argument(
        "--overwrite", action="store_true", help="replace a run already in the output directory"
    )
    t.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split (and validation, post-hoc)")
    e.add_argument("checkpoint")
    e.add_argument("--posthoc", nargs="*", help="post-hoc adjusters to fit on validation and apply")
    e.add_argument("--data-dir", help="override data.data_dir (detection: data.image_root)")
    e.add_argument("--split", choices=["val", "test"], help="detection: the split to evaluate")
    e.add_argument("--output", help="where to write final.json (default: <run>/eval)")
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    e.add_argument("--full", action="store_true", help="with --json: everything, not only the last epoch")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser(
        "predict",
        help="top-k classes of image files from a checkpoint alone",
        description="Top-k classes and probabilities of image files, from a checkpoint alone (no training "
        "data). Probabilities are the softmax of the model's logits as the run's loss reads them; with "
        "--posthoc, the softmax of the logits after the adjuster the run fitted on validation.",
    )
    pr.add_argument("checkpoint", help="a run's checkpoint, e.g. runs/fmnist_lt_ce/checkpoints/last.pt")
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (every image inside, recursively, sorted) or .txt/.csv lists of paths "
        "(one per line, or a 'path' column; relative to the list's folder)",
    )
    pr.add_argument(
        "--posthoc",
        metavar="NAME",
        help="apply the post-hoc adjuster the run fitted on validation (its eval.posthoc: posthoc_la, "
        "tau_norm, gala_rebalance; gala_rebalance estimates its class prior from the images given)",
    )
    pr.add_argument("--top-k", type=int, metavar="K", help="classes per image (default: 5, at most all)")
    pr.add_argument(
        "--output", help="preds.csv or preds.json (the extension picks the format); default: CSV on stdout"
    )
    pr.add_argument(
        "--batch-size", type=int, metavar="N", help="images per forward pass (default: eval.batch_size)"
    )
    pr.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")
    pr.set_defaults(func=_cmd_predict)

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
        default="balanced_accuracy",
        choices=["balanced_accuracy", "top1", "few", "mix"],
        help="validation metric to maximise (mix: (1-w) balanced accuracy + w Few)",
    )
    tu.add_argument("--mix-weight", type=float, default=0.5, metavar="W", help="w of --objective mix")
    tu.add_argument("--epochs", type=int, help="epochs of each trial (default: the method's schedule)")
    tu.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    tu.add_argument("--seed", type=int, default=0, help="TPE sampler seed (default 0)")
    tu.add_argument("--no-test", action="store_true", help="skip the chosen configuration's test run")
    tu.add_argument("--overwrite", action="store_true", help="replace a chosen configuration's test run")
    tu.set_defaults(func=_cmd_tune)

    ls = sub.add_parser("list", help="list registered datasets, models, losses, regularizers, update rules")
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
