"""The report of an instance segmentation suite (docs/instance.md §5): mask AP / AP50 / APr / APc / APf and
box AP / APr (mean ± sample std over seeds, last epoch; validation-selected rows apart), mask AP per class
against the number of training images (LVIS rare / common / frequent groups marked), and each method's
test images with its predicted masks (the figure every run draws at its end, :func:`draw_instances`).

Files: ``results.json``, ``report.md`` with ``figure_<k>.png``, and a self-contained ``report.html``.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.report.aggregate import format_mean_std, mean_std
from gradtail.report.detection import GROUP_NAMES, ap_vs_frequency_figure
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

METRICS = ("AP", "AP50", "APr", "APc", "APf", "box_AP", "box_APr", "box_APc", "box_APf")
HEADERS = ("method", "mask AP", "AP50", "APr", "APc", "APf", "box AP", "box APr", "box APc", "box APf")


def _rows(suite: Any, finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
                    **{k: mean_std([r.get(k) for r in recs]) for k in METRICS},
                    "train_seconds": mean_std([r.get("train_seconds") for r in runs]),
                    "mean_step_s": mean_std([r.get("mean_step_s") for r in runs]),
                }
            )
    return rows


def build_results(
    suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """Everything the instance segmentation report shows, as one JSON-serialisable record."""
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
        "task": "instance_segmentation",
        **results_header(suite, finals, run_dir, wall_seconds),
        "protocol": first["last_epoch"].get("protocol"),
        "subset": subset,
        "recipes": recipes,
        "seeds": suite.seeds,
        "metrics": list(METRICS),
        "columns": list(HEADERS),
        "table": _rows(suite, finals),
        "classes": classes,
        "per_class_ap": per_class,
        "runs": [
            {
                "method": f["method"],
                "seed": f["seed"],
                "config_hash": f["config_hash"],
                "last_epoch": {
                    k: f["last_epoch"].get(k) for k in (*METRICS, "per_class_ap", "box_per_class_ap")
                },
                "val_selected": f.get("val_selected"),
                "train_seconds": f.get("train_seconds"),
                "mean_step_s": f.get("mean_step_s"),
            }
            for f in finals
        ],
    }


def _protocol(results: dict[str, Any]) -> str:
    s = results["subset"]
    groups = defaultdict(list)
    for c in results["classes"]:
        groups[c["frequency"]].append(f"{c['name']} ({c['train_images']})")
    group_text = "; ".join(f"{GROUP_NAMES.get(k, k)}: {', '.join(v)}" for k, v in sorted(groups.items()))
    where = (
        f"the Fashion-MNIST instance benchmark ({s.get('benchmark_root')})"
        if s.get("benchmark_root")
        else f"annotation files {s.get('annotation_files')}"
    )
    recipes = []
    for method, r in results["recipes"].items():
        model, loss, o, d = r["model"], r["loss"], r["optim"], r["data"]
        params = model.get("params") or {}
        recipes.append(
            f"{method}: {model['name']} ({params.get('backbone', 'tiny')}, width {params.get('width', 64)}), "
            f"loss {loss['name']}{' ' + str(loss['params']) if loss.get('params') else ''}, "
            f"{o['epochs']} epochs, batch {o['batch_size']}, SGD lr {o['lr']:g} ({o['schedule']}), "
            f"sampler {d['sampler']}{' ' + str(d['sampler_params']) if d.get('sampler_params') else ''}"
        )
    keys = [k for k in ("train_images", "val_images", "test_images") if k in s]
    splits = ", ".join(f"{s[k]} {k.removesuffix('_images')}" for k in keys)
    return (
        f"Data: {where}; images: {splits}; data SHA-256 {str(s.get('sha256'))[:16]}…. Classes by LVIS "
        f"frequency group (training images with the class): {group_text}. Evaluation: "
        f"{str(results.get('protocol')).upper()} mask AP (segm; box AP alongside) through the official API "
        f"on the test split once, after the last epoch (validation mask AP, every evaluated epoch, selects "
        f"the val-selected rows), mean ± sample std over seeds {results['seeds']}. Recipes: "
        + "; ".join(recipes)
        + "."
    )


def write_report(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """results.json, report.md (+ PNG files) and a self-contained report.html."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1, default=float))
    labels = {r["method"]: r["label"] for r in results["table"]}
    figs: list[tuple[str, bytes, str]] = [
        (
            "Mask AP per class against training frequency",
            _png(ap_vs_frequency_figure(results["per_class_ap"], results["classes"], labels)),
            "Each class's test mask AP at the last epoch (mean over seeds) against the number of training "
            "images that contain it, most frequent first.",
        )
    ]
    seed = results["seeds"][0]
    for row in results["table"]:
        drawn = output / row["method"] / f"seed{seed}" / "predictions.png"
        if row["kind"] == "last_epoch" and drawn.is_file():
            figs.append(
                (
                    f"Test images: {row['label']} (seed {seed})",
                    drawn.read_bytes(),
                    "Ground-truth outlines in green; the top predicted masks tinted, with class and score.",
                )
            )
    methods = [(r["method"], r["label"]) for r in results["table"] if r["kind"] == "last_epoch"]
    curve = test_curve_figure(output, methods, seed, "AP")
    if curve is not None:
        figs.append(curve)
    headers = [*HEADERS, "training / run", "step"]
    rows_md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    rows_html = []
    for row in results["table"]:
        cells = [format_mean_std(row[m]) for m in METRICS]
        t, step = row["train_seconds"]["mean"], row["mean_step_s"]["mean"]
        cells += [f"{t:.0f} s" if t is not None else "N/A", f"{1000 * step:.0f} ms" if step else "N/A"]
        rows_md.append("| " + " | ".join([row["label"], *cells]) + " |")
        rows_html.append(
            f"<tr class='{row['kind']}'><td>{html.escape(row['label'])}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    env = results["environment"]
    timing = f"Training time summed over runs: {duration(results['train_seconds_total'])}."
    if results.get("wall_seconds") is not None:
        timing += f" Wall time of the last invocation: {duration(results['wall_seconds'])}."
    env_line = (
        f"gradtail {env.get('gradtail')} ({(env.get('git_commit') or '')[:10]}), torch {env.get('torch')}, "
        f"torchvision {env.get('torchvision')}, {env.get('device')}, {env.get('cpu_count')} CPUs. {timing}"
    )
    md = [f"# gradtail bench: {results['suite']}", "", results.get("description", ""), "", "## Results", ""]
    md += [*rows_md, "", "## Protocol", "", _protocol(results), "", f"Environment: {env_line}", ""]
    md += ["## Figures", ""]
    html_figs = write_figures(figs, output, md)
    (output / "report.md").write_text("\n".join(md))
    head = "".join(f"<th>{h}</th>" for h in headers)
    seeds = results["seeds"]
    lead = (
        f"\n<p class='protocol'>Test mask AP and box AP (%) at the last epoch, mean ± sample std over seeds "
        f"{seeds}.</p>"
    )
    body = report_body(results, head, "".join(rows_html), _protocol(results), env_line, html_figs, lead)
    (output / "report.html").write_text(html_page(f"gradtail bench: {results['suite']}", body))
    return report_paths(output)


def table(results: dict[str, Any]) -> str:
    """The results table as text (what ``gradtail bench`` / ``report`` print)."""
    rows = [[r["label"], *(format_mean_std(r[m]) for m in METRICS)] for r in results["table"]]
    return format_table(rows, HEADERS)


def draw_instances(
    items: list[tuple[Any, dict[str, Any]]],
    outputs: list[dict[str, Any]],
    names: list[str],
    path: Path,
    top: int = 4,
    min_score: float = 0.1,
    threshold: float = 0.5,
) -> None:
    """A row of test images with the ground-truth outlines (green) and the top predicted masks (tinted, with
    their box, class and score): what every instance segmentation run writes at its end
    (``predictions.png``)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    colors = colormaps["tab10"]
    count = len(items)
    fig = Figure(figsize=(2.6 * count, 2.9), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False)
    for k, ax in enumerate(axes[0]):
        image, target = items[k]
        rgb = image.permute(1, 2, 0).float().numpy().clip(0, 1).copy()
        out = outputs[k]
        keep = (out["scores"] >= min_score).nonzero().flatten()[:top].tolist()
        for rank, i in enumerate(keep):
            mask = out["masks"][i, 0].numpy() >= threshold
            rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.asarray(colors(rank % 10)[:3])
        ax.imshow(rgb)
        for gt in np.asarray(target.get("masks", np.zeros((0, 1, 1)))):
            if gt.any():
                ax.contour(gt.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        for rank, i in enumerate(keep):
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colors(rank % 10), lw=0.8))
            label = f"{names[int(out['labels'][i])]} {float(out['scores'][i]):.2f}"
            ax.text(x1, y1, label, color="yellow", fontsize=5, va="bottom")
        ax.set_axis_off()
    fig.suptitle(
        f"test images: ground truth (green outlines), predicted masks (score >= {min_score:.1f})", fontsize=8
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(fig))


__all__ = ["HEADERS", "METRICS", "build_results", "draw_instances", "table", "write_report"]
