"""The report of a segmentation suite: mIoU / mAcc / aAcc / per-group mIoU (mean ± std over seeds), IoU per
class against training pixel frequency, and each method's test images with predicted label maps beside the
ground truth (the figure every run draws at its end, :func:`draw_samples`).
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradtail.report.aggregate import format_mean_std, mean_std
from gradtail.report.page import (
    html_page,
    report_body,
    report_paths,
    results_header,
    test_curve_figure,
    write_figures,
)
from gradtail.report.plots import _png
from gradtail.report.table import format_table

METRICS = ("miou", "macc", "aacc", "miou_frequent", "miou_common", "miou_rare")
HEADERS = ("method", "mIoU", "mAcc", "aAcc", "mIoU frequent", "mIoU common", "mIoU rare")
SAMPLE_IMAGES = 4


def _rows(finals: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        by_method[f["method"]].append(f)
    rows = []
    for kind in ("last_epoch", "val_selected"):
        for method in order:
            runs = sorted(by_method.get(method, []), key=lambda f: f["seed"])
            if kind == "last_epoch":
                recs = [f["last_epoch"] for f in runs]
            else:
                recs = [f["val_selected"]["test"] for f in runs if f.get("val_selected")]
            if not recs:
                continue
            label = method if kind == "last_epoch" else f"{method} (val-selected)"
            rows.append(
                {"label": label, "kind": kind, "method": method, "seeds": [f["seed"] for f in runs]}
                | {m: mean_std([r.get(m) for r in recs]) for m in METRICS}
            )
    return rows


def build_results(
    suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """Everything the segmentation report shows, as one JSON-serialisable record."""
    order = [m.name for m in suite.methods]
    first = finals[0]
    run_dir = output / first["method"] / f"seed{first['seed']}"
    subset = json.loads((run_dir / "subset.json").read_text())
    config = suite.run_config(suite.method(first["method"]), first["seed"])
    per_class: dict[str, list[float | None]] = {}
    for method in order:
        ious = [f["last_epoch"]["per_class_iou"] for f in finals if f["method"] == method]
        if ious:
            per_class[method] = [mean_std([v[k] for v in ious])["mean"] for k in range(len(ious[0]))]
    return {
        "task": "segmentation",
        **results_header(suite, finals, run_dir, wall_seconds),
        "subset": subset,
        "groups": first.get("groups"),
        "recipe": {
            "model": config.model.name,
            "model_params": config.model.params,
            "epochs": config.optim.epochs,
            "batch_size": config.optim.batch_size,
            "lr": config.optim.lr,
            "schedule": config.optim.schedule,
            "weight_decay": config.optim.weight_decay,
            "segmentation": config.to_dict().get("segmentation"),
            "precision": sorted({str((f.get("amp") or {}).get("resolved", "none")) for f in finals}),
        },
        "seeds": suite.seeds,
        "metrics": list(METRICS),
        "columns": list(HEADERS),
        "table": _rows(finals, order),
        "per_class_iou": per_class,
        "runs": [
            {
                "method": f["method"],
                "seed": f["seed"],
                "config_hash": f["config_hash"],
                "subset_sha256": f["subset_sha256"],
                "train_seconds": f.get("train_seconds"),
                "last_epoch": {k: f["last_epoch"].get(k) for k in (*METRICS, "per_class_iou")},
            }
            for f in finals
        ],
    }


def iou_vs_frequency_figure(
    per_class: dict[str, list[float | None]], counts: list[int], names: list[str]
) -> Any:
    """IoU of every class (mean over seeds) against its share of the training pixels (log x)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    total = float(sum(counts)) or 1.0
    share = np.array(counts, dtype=np.float64) / total
    order = np.argsort(-share)
    for label, ious in per_class.items():
        y = [np.nan if ious[k] is None else 100 * ious[k] for k in order]
        ax.plot(share[order], y, marker="o", label=label)
    for k in order:
        ax.annotate(names[k], (share[k], 2), fontsize=7, rotation=90, ha="center", va="bottom", color="0.4")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("share of training pixels (log scale; frequent classes left)")
    ax.set_ylabel("test IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _palette(num_classes: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colors = np.array([cmap(k % 20)[:3] for k in range(num_classes)])
    colors[0] = (0.05, 0.05, 0.05)  # class 0 (background on the canvases) dark
    return colors


def _colorize(mask: np.ndarray, palette: np.ndarray, ignore: int) -> np.ndarray:
    out = np.ones((*mask.shape, 3))
    keep = mask != ignore
    out[keep] = palette[mask[keep]]
    return out


def draw_samples(
    images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, num_classes: int, ignore: int, path: Path
) -> None:
    """A PNG of test images (rows: image, ground truth, prediction), one colour per class; what every
    segmentation run writes at its end (``predictions.png``) and the report shows."""
    from matplotlib.figure import Figure

    palette = _palette(num_classes)
    count = len(pred)
    fig = Figure(figsize=(1.6 * count + 0.4, 5.2), layout="constrained")
    axes = fig.subplots(3, count, squeeze=False)
    for i in range(count):
        img = images[i].float().cpu().numpy().transpose(1, 2, 0)
        panels = [
            img[..., 0] if img.shape[-1] == 1 else img.clip(0, 1),
            _colorize(truth[i].cpu().numpy(), palette, ignore),
            _colorize(pred[i].cpu().numpy(), palette, ignore),
        ]
        for j, panel in enumerate(panels):
            ax = axes[j, i]
            ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(("image", "ground truth", "prediction")[j], fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(fig))


def _protocol(results: dict[str, Any]) -> str:
    s, r, g = results["subset"], results["recipe"], results.get("groups") or {}
    names = s.get("class_names", [])
    classes = g.get("classes", {})
    group_text = "; ".join(
        f"{k}: {', '.join(names[c] for c in v) if names else v}" for k, v in classes.items()
    )
    th = g.get("thresholds", {})
    return (
        f"Data: {s.get('dataset')} ({s.get('train_images')} training, {s.get('val_images')} validation, "
        f"{s.get('test_images')} test images; training subset SHA-256 {str(s.get('sha256'))[:16]}…). "
        f"Training pixels per class: {s.get('counts')}. Frequency groups by share of the training pixels "
        f"(frequent >= {th.get('frequent')}, rare < {th.get('rare')}): {group_text}. "
        f"Recipe: {r['model']} {r['model_params']}, {r['epochs']} epochs, batch {r['batch_size']}, SGD lr "
        f"{r['lr']:g} ({r['schedule']}), weight decay {r['weight_decay']:g}; precision "
        f"{' / '.join(r['precision'])}. Numbers are test mIoU / mAcc / aAcc (%) from one confusion matrix "
        f"over the test split at the last epoch, mean ± sample std over seeds {results['seeds']}; rows "
        "marked (val-selected) pick the epoch with the best validation mIoU."
    )


def write_report(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """results.json, report.md (+ PNG files) and a self-contained report.html."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    s = results["subset"]
    names = s.get("class_names") or [str(k) for k in range(len(s["counts"]))]
    figs: list[tuple[str, bytes, str]] = [
        (
            "IoU per class against training pixel frequency",
            _png(iou_vs_frequency_figure(results["per_class_iou"], s["counts"], names)),
            "Each class's test IoU at the last epoch (mean over seeds) against its share of the training "
            "pixels, most frequent first.",
        )
    ]
    seed = results["seeds"][0]
    for row in results["table"]:
        picture = output / row["method"] / f"seed{seed}" / "predictions.png"
        if row["kind"] == "last_epoch" and picture.is_file():
            figs.append(
                (
                    f"{row['label']}: test images, ground truth and prediction (seed {seed})",
                    picture.read_bytes(),
                    "The first test images, their label maps and the run's predicted label map at the last "
                    "epoch (argmax of the logits), one colour per class.",
                )
            )
    methods = [(r["method"], r["label"]) for r in results["table"] if r["kind"] == "last_epoch"]
    curve = test_curve_figure(output, methods, seed, "miou")
    if curve is not None:
        figs.append(curve)
    rows_md = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    rows_html = []
    for row in results["table"]:
        cells = [format_mean_std(row[m]) for m in METRICS]
        rows_md.append("| " + " | ".join([row["label"], *cells]) + " |")
        rows_html.append(
            f"<tr class='{row['kind']}'><td>{html.escape(row['label'])}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    env = results["environment"]
    timing = f"Training time summed over runs: {results['train_seconds_total'] / 60:.1f} min."
    if results.get("wall_seconds"):
        timing += f" Wall time of the last invocation: {results['wall_seconds'] / 60:.1f} min."
    env_line = f"torch {env.get('torch')}, {env.get('device')}, {env.get('cpu_count')} CPUs. {timing}"
    md = [f"# gradtail bench: {results['suite']}", "", results.get("description", ""), "", "## Results", ""]
    md += [*rows_md, "", "## Protocol", "", _protocol(results), "", f"Environment: {env_line}", ""]
    md += ["## Figures", ""]
    html_figs = write_figures(list(figs), output, md)
    (output / "report.md").write_text("\n".join(md))
    head = "".join(f"<th>{h}</th>" for h in HEADERS)
    body = report_body(results, head, "".join(rows_html), _protocol(results), env_line, html_figs)
    page = html_page(f"gradtail bench: {results['suite']}", body)
    (output / "report.html").write_text(page)
    return report_paths(output)


def table(results: dict[str, Any]) -> str:
    """The results table as text (what ``gradtail bench`` / ``report`` print)."""
    rows = [[r["label"], *(format_mean_std(r[m]) for m in METRICS)] for r in results["table"]]
    return format_table(rows, HEADERS)
