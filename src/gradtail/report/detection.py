"""The report of a detection suite: AP / AP50 / APr / APc / APf (mean ± sample std over seeds, last epoch;
validation-selected rows apart), AP per class against the number of training images (LVIS rare / common /
frequent groups marked), and each method's test images with its predicted boxes (the figure every run
draws at its end, :func:`draw_detections`).

Files: ``results.json`` (everything below, JSON), ``report.md`` with ``figure_<k>.png``, and a
self-contained ``report.html``.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gradtail.report.aggregate import format_mean_std, mean_std
from gradtail.report.page import (
    duration,
    html_page,
    report_body,
    report_paths,
    results_header,
    test_curve_figure,
    write_figures,
)
from gradtail.report.plots import _png
from gradtail.report.table import format_table

METRICS = ("AP", "AP50", "APr", "APc", "APf")
HEADERS = ("method", "AP", "AP50", "APr", "APc", "APf")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _rows(suite: Any, finals: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The results table: per method, ``metrics`` (mean ± std over seeds) at the last epoch, then the
    validation-selected rows."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        by_method[f["method"]].append(f)
    rows = []
    for kind in ("last_epoch", "val_selected"):
        for m in suite.methods:
            runs = sorted(by_method.get(m.name, []), key=lambda f: f["seed"])
            if kind == "last_epoch":
                recs = [r["last_epoch"] for r in runs]
            else:
                recs = [r["val_selected"]["test"] for r in runs if (r.get("val_selected") or {}).get("test")]
            if not recs:
                continue
            label = m.label or m.name
            rows.append(
                {
                    "label": label if kind == "last_epoch" else f"{label} (val-selected)",
                    "method": m.name,
                    "kind": kind,
                    "seeds": [r["seed"] for r in runs],
                    **{k: mean_std([r.get(k) for r in recs]) for k in metrics},
                    "train_seconds": mean_std([r.get("train_seconds") for r in runs]),
                    "mean_step_s": mean_std([r.get("mean_step_s") for r in runs]),
                }
            )
    return rows


def ap_vs_frequency_figure(
    per_class: dict[str, list[float | None]], classes: list[dict[str, Any]], labels: dict[str, str]
) -> Any:
    """AP of every class (mean over seeds) against its number of training images (log x), one line per
    method; the class names are written at the bottom, coloured by their LVIS frequency group."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    counts = np.array([max(c["train_images"], 1) for c in classes], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    for method, aps in per_class.items():
        y = [np.nan if aps[k] is None else 100 * aps[k] for k in order]
        ax.plot(counts[order], y, marker="o", label=labels.get(method, method))
    colors = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    for k in order:
        c = classes[k]
        ax.annotate(c["name"], (counts[k], 1), fontsize=7, rotation=90, ha="center", va="bottom",
                    color=colors.get(c["frequency"], "0.4"))  # fmt: skip
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training images with the class (log scale; frequent left); names: rare red, common "
                  "orange, frequent blue")  # fmt: skip
    ax.set_ylabel("test AP (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _cells(row: dict[str, Any], metrics: tuple[str, ...]) -> list[str]:
    """A table row's cells after its label: ``metrics`` (mean ± std), training time per run, step time."""
    cells = [format_mean_std(row[m]) for m in metrics]
    t, step = row["train_seconds"]["mean"], row["mean_step_s"]["mean"]
    return [*cells, f"{t:.0f} s" if t is not None else "N/A", f"{1000 * step:.0f} ms" if step else "N/A"]


def _environment_line(results: dict[str, Any]) -> str:
    """The machine, the versions and the training / wall time of a suite."""
    env = results["environment"]
    timing = f"Training time summed over runs: {duration(results['train_seconds_total'])}."
    if results.get("wall_seconds") is not None:  # finished runs are skipped: a re-run takes seconds
        timing += f" Wall time of the last invocation: {duration(results['wall_seconds'])}."
    return (
        f"gradtail {env.get('gradtail')} ({(env.get('git_commit') or '')[:10]}), torch {env.get('torch')}, "
        f"torchvision {env.get('torchvision')}, {env.get('device')}, {env.get('cpu_count')} CPUs. {timing}"
    )


class DetectionReport:
    """The report of a suite whose runs score AP by LVIS frequency group: the table, the per-class figure,
    the protocol paragraph and the pages. Detection's is :data:`REPORT`; instance segmentation's
    (:class:`gradtail.report.instance.InstanceReport`) extends it with its metrics and wording."""

    task: ClassVar[str] = "detection"
    metrics: ClassVar[tuple[str, ...]] = METRICS
    headers: ClassVar[tuple[str, ...]] = HEADERS
    per_class_keys: ClassVar[tuple[str, ...]] = ("per_class_ap",)  # the per-class lists of a run's record
    ap_name: ClassVar[str] = "AP"  # the primary AP, as the prose names it
    evaluated: ClassVar[str] = "AP"  # what the protocol paragraph says is evaluated
    lead_metrics: ClassVar[str] = "AP"  # what the table above shows
    figure_title: ClassVar[str] = "AP per class against training frequency"
    predictions_caption: ClassVar[str] = (
        "Ground-truth boxes in green; the top predictions in red with class and score."
    )

    def build_results(
        self, suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
    ) -> dict[str, Any]:
        """Everything the report shows, as one JSON-serialisable record."""
        first = finals[0]
        run_dir = output / first["method"] / f"seed{first['seed']}"
        subset = json.loads((run_dir / "subset.json").read_text())
        per_class: dict[str, list[float | None]] = {}
        for m in suite.methods:
            runs = [f for f in finals if f["method"] == m.name]
            if runs:
                aps = [r["last_epoch"]["per_class_ap"] for r in runs]
                per_class[m.name] = [mean_std([a[k] for a in aps])["mean"] for k in range(len(aps[0]))]
        classes = [
            {"name": n, "frequency": f, "train_images": c}
            for n, f, c in zip(subset["class_names"], subset["frequencies"], subset["counts"], strict=True)
        ]
        recipes = {}
        for f in finals:
            if f["seed"] == first["seed"]:
                cfg = suite.run_config(suite.method(f["method"]), f["seed"]).to_dict()
                recipes[f["method"]] = {k: cfg[k] for k in ("model", "loss", "optim", "data")}
        return {
            "task": self.task,
            **results_header(suite, finals, run_dir, wall_seconds),
            "protocol": first["last_epoch"].get("protocol"),
            # the LVIS / COCO evaluator each run's test split went through (final.json; absent in runs
            # written before the choice existed: the official API)
            "evaluators": sorted({f["last_epoch"].get("evaluator") or "lvis" for f in finals}),
            "subset": subset,
            "recipes": recipes,
            "seeds": suite.seeds,
            "metrics": list(self.metrics),
            "columns": list(self.headers),
            "table": _rows(suite, finals, self.metrics),
            "classes": classes,
            "per_class_ap": per_class,
            "runs": [
                {
                    "method": f["method"],
                    "seed": f["seed"],
                    "config_hash": f["config_hash"],
                    "last_epoch": {k: f["last_epoch"].get(k) for k in (*self.metrics, *self.per_class_keys)},
                    "val_selected": f.get("val_selected"),
                    "train_seconds": f.get("train_seconds"),
                    "mean_step_s": f.get("mean_step_s"),
                }
                for f in finals
            ],
        }

    # ------------------------------------------------------------------ the protocol paragraph
    def where(self, subset: dict[str, Any]) -> str:
        """Where the data came from: the Fashion-MNIST benchmark or the annotation files."""
        if subset.get("dataset") == "fm_detection":
            return f"the Fashion-MNIST detection benchmark ({subset.get('benchmark_root')})"
        return f"annotation files {subset.get('annotation_files')}"

    def schedule(self, optim: dict[str, Any]) -> str:
        """The learning-rate schedule of a recipe."""
        return (
            f"{optim['schedule']}: warm-up {optim['warmup_iters']} iterations, x{optim['step_gamma']:g} at "
            f"{list(optim['step_fractions'])} of the run"
        )

    def sampler(self, data: dict[str, Any]) -> str:
        """The training sampler of a recipe."""
        return str(data["sampler"])

    def recipe(self, method: str, recipe: dict[str, Any]) -> str:
        """One method's recipe: model, loss, schedule, sampler."""
        model, loss, o = recipe["model"], recipe["loss"], recipe["optim"]
        params = model.get("params") or {}
        return (
            f"{method}: {model['name']} ({params.get('backbone', 'tiny')}, width {params.get('width', 64)}), "
            f"loss {loss['name']}{' ' + str(loss['params']) if loss.get('params') else ''}, "
            f"{o['epochs']} epochs, batch {o['batch_size']}, SGD lr {o['lr']:g} ({self.schedule(o)}), "
            f"sampler {self.sampler(recipe['data'])}"
        )

    def protocol(self, results: dict[str, Any]) -> str:
        """The protocol paragraph: data, LVIS groups, evaluation, recipes."""
        s = results["subset"]
        groups = defaultdict(list)
        for c in results["classes"]:
            groups[c["frequency"]].append(f"{c['name']} ({c['train_images']})")
        group_text = "; ".join(f"{GROUP_NAMES.get(k, k)}: {', '.join(v)}" for k, v in sorted(groups.items()))
        recipes = [self.recipe(method, r) for method, r in results["recipes"].items()]
        keys = [k for k in ("train_images", "val_images", "test_images") if k in s]
        splits = ", ".join(f"{s[k]} {k.removesuffix('_images')}" for k in keys)
        return (
            f"Data: {self.where(s)}; images: {splits}; data SHA-256 {str(s.get('sha256'))[:16]}…. Classes by "
            f"LVIS frequency group (training images with the class): {group_text}. Evaluation: "
            f"{str(results.get('protocol')).upper()} {self.evaluated} through {self.evaluator_text(results)} "
            "on the "
            f"test split once, after the last epoch (validation {self.ap_name}, every evaluated epoch, "
            f"selects the val-selected rows), mean ± sample std over seeds {results['seeds']}. Recipes: "
            + "; ".join(recipes)
            + "."
        )

    @staticmethod
    def evaluator_text(results: dict[str, Any]) -> str:
        """Which evaluator scored the runs: the official API or faster-coco-eval (proven equal to it,
        docs/detection.md), as their final.json records it."""
        names = {
            "lvis": "the official lvis API",
            "pycocotools": "the official pycocotools API",
            "faster_coco_eval": "faster-coco-eval (equal to the official API, docs/detection.md)",
        }
        used = results.get("evaluators") or ["lvis"]
        return " and ".join(names.get(e, e) for e in used)

    # ------------------------------------------------------------------ the pages
    def figures(self, results: dict[str, Any], output: Path) -> list[tuple[str, bytes, str]]:
        """(title, PNG, caption) of every figure: AP per class, each method's test images (the runs'
        ``predictions.png``), the test curve where the runs recorded one."""
        labels = {r["method"]: r["label"] for r in results["table"]}
        figs: list[tuple[str, bytes, str]] = [
            (
                self.figure_title,
                _png(ap_vs_frequency_figure(results["per_class_ap"], results["classes"], labels)),
                f"Each class's test {self.ap_name} at the last epoch (mean over seeds) against the number of "
                "training images that contain it, most frequent first.",
            )
        ]
        seed = results["seeds"][0]
        for row in results["table"]:
            drawn = output / row["method"] / f"seed{seed}" / "predictions.png"
            if row["kind"] == "last_epoch" and drawn.is_file():
                title = f"Test images: {row['label']} (seed {seed})"
                figs.append((title, drawn.read_bytes(), self.predictions_caption))
        methods = [(r["method"], r["label"]) for r in results["table"] if r["kind"] == "last_epoch"]
        curve = test_curve_figure(output, methods, seed, "AP")
        if curve is not None:
            figs.append(curve)
        return figs

    def write_report(self, results: dict[str, Any], output: Path) -> dict[str, Path]:
        """results.json, report.md (+ PNG files) and a self-contained report.html."""
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=1, default=float))
        figs = self.figures(results, output)
        suite = results["suite"]
        headers = [*self.headers, "training / run", "step"]
        rows_md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        rows_html = []
        for row in results["table"]:
            cells = _cells(row, self.metrics)
            rows_md.append("| " + " | ".join([row["label"], *cells]) + " |")
            rows_html.append(
                f"<tr class='{row['kind']}'><td>{html.escape(row['label'])}</td>"
                + "".join(f"<td>{c}</td>" for c in cells)
                + "</tr>"
            )
        env_line = _environment_line(results)
        protocol = self.protocol(results)
        md = [f"# gradtail bench: {suite}", "", results.get("description", ""), "", "## Results", ""]
        md += [*rows_md, "", "## Protocol", "", protocol, "", f"Environment: {env_line}", ""]
        md += ["## Figures", ""]
        html_figs = write_figures(figs, output, md)
        (output / "report.md").write_text("\n".join(md))
        head = "".join(f"<th>{h}</th>" for h in headers)
        lead = (
            f"\n<p class='protocol'>Test {self.lead_metrics} (%) at the last epoch, mean ± sample std over "
            f"seeds {results['seeds']}.</p>"
        )
        body = report_body(results, head, "".join(rows_html), protocol, env_line, html_figs, lead)
        (output / "report.html").write_text(html_page(f"gradtail bench: {suite}", body))
        return report_paths(output)

    def table(self, results: dict[str, Any]) -> str:
        """The results table as text (what ``gradtail bench`` / ``report`` print)."""
        rows = [[r["label"], *(format_mean_std(r[m]) for m in self.metrics)] for r in results["table"]]
        return format_table(rows, self.headers)


#: Detection's report: the task's report module is this module, its functions the methods below.
REPORT = DetectionReport()
build_results = REPORT.build_results
write_report = REPORT.write_report
table = REPORT.table


def draw_image_row(
    items: list[tuple[Any, dict[str, Any]]],
    outputs: list[dict[str, Any]],
    draw: Callable[[Any, Any, dict[str, Any], dict[str, Any]], None],
    title: str,
    path: Path,
) -> None:
    """A row of test images, each drawn by ``draw(ax, image, target, output)``, titled ``title``, written
    as a PNG to ``path``: the frame of :func:`draw_detections` and the instance task's ``draw_instances``."""
    from matplotlib.figure import Figure

    count = len(items)
    fig = Figure(figsize=(2.6 * count, 2.9), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False)
    for k, ax in enumerate(axes[0]):
        image, target = items[k]
        draw(ax, image, target, outputs[k])
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(fig))


def top_predictions(output: dict[str, Any], top: int, min_score: float) -> list[int]:
    """The indices of the ``top`` first predictions (the detector's order: best first) scoring ``min_score``
    or more."""
    indices: list[int] = (output["scores"] >= min_score).nonzero().flatten()[:top].tolist()
    return indices


def draw_prediction_box(
    ax: Any, output: dict[str, Any], i: int, names: list[str], color: Any, lw: float
) -> None:
    """Prediction ``i``'s box in ``color``, labelled with its class and score."""
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = output["boxes"][i].tolist()
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=color, lw=lw))
    label = f"{names[int(output['labels'][i])]} {float(output['scores'][i]):.2f}"
    ax.text(x1, y1, label, color="yellow", fontsize=5, va="bottom")


def draw_detections(
    items: list[tuple[Any, dict[str, Any]]],
    outputs: list[dict[str, Any]],
    names: list[str],
    path: Path,
    top: int = 4,
    min_score: float = 0.1,
) -> None:
    """A row of test images with ground truth (green) and the top predictions (red, labelled): what every
    detection run writes at its end (``predictions.png``) and the report shows."""
    from matplotlib.patches import Rectangle

    def draw(ax: Any, image: Any, target: dict[str, Any], out: dict[str, Any]) -> None:
        ax.imshow(image.permute(1, 2, 0).float().numpy().clip(0, 1))
        for x1, y1, x2, y2 in target["boxes"].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        for i in top_predictions(out, top, min_score):
            draw_prediction_box(ax, out, i, names, "red", 1)

    title = f"test images: ground truth (green), predictions (red, score >= {min_score:.1f})"
    draw_image_row(items, outputs, draw, title, path)


__all__ = [
    "HEADERS",
    "METRICS",
    "REPORT",
    "DetectionReport",
    "ap_vs_frequency_figure",
    "build_results",
    "draw_detections",
    "draw_image_row",
    "table",
    "write_report",
]
