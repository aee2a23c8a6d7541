"""Report cosmetics (issue 13, fault 8): integer epoch ticks, labelled g reference lines, no colliding
labels in the figures, the fitted post-hoc tau in the HTML / Markdown tables, singular / plural prose.

Everything here renders from hand-made ``final.json``-like records: no training."""

import json
import re

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from gradtail.report import plots
from gradtail.report.aggregate import aggregate, format_params
from gradtail.report.classification import protocol_paragraph, write_report

COUNTS = [40, 20, 10, 5]


def _bins(seed: int) -> dict:
    edges = [i / 15 for i in range(16)]
    return {
        "edges": edges,
        "accuracy": [((i * 7 + seed) % 10) / 10 for i in range(15)],
        "count": [(i + seed) % 3 for i in range(15)],
    }


def _metrics(top1: float) -> dict:
    return {"top1": top1, "many": 0.9, "medium": 0.5, "few": 0.1, "ece": 0.05}


def _final(method: str, seed: int, taus: dict[str, float] | None = None) -> dict:
    last = {**_metrics(0.5 + seed / 100), "per_class": [0.9, 0.6, 0.3, 0.1], "mce": 0.1, "nll": 1.0}
    final = {
        "method": method,
        "seed": seed,
        "config_hash": "h",
        "subset_sha256": "s",
        "train_seconds": 2.0,
        "last_epoch": last,
        "val_selected": None,
        "posthoc": {},
    }
    for name, tau in (taus or {}).items():
        params = {"tau": tau, **({"bias_mode": "scale"} if name == "tau_norm" else {})}
        final["posthoc"][name] = {**_metrics(0.55), "params": params}
    return final


def _results(finals: list[dict], seeds: list[int], warmup: float = 1, epochs: int = 3) -> dict:
    methods = list(dict.fromkeys(f["method"] for f in finals))
    return {
        "notes": ["GBG: the BCL term is the separate `bcl` regularizer."],
        "suite": "cosmetics",
        "description": "hand-made records",
        "wall_seconds": 5.0,
        "train_seconds_total": 6.0,
        "environment": {"gradtail": "0", "git_commit": "abc", "torch": "2", "device": "cpu", "cpu_count": 2},
        "subset": {
            "dataset": "synthetic",
            "imbalance_factor": 8,
            "profile": "exp",
            "subset_seed": 0,
            "train_images": sum(COUNTS),
            "counts": COUNTS,
            "sha256": "0" * 64,
            "val_counts": [1] * len(COUNTS),
            "test_images": 40,
        },
        "recipe": {
            "model": "small_cnn",
            "model_params": {"width": 4},
            "epochs": epochs,
            "batch_size": 16,
            "lr": 0.1,
            "schedule": "cosine",
            "warmup_epochs": warmup,
            "weight_decay": 5e-4,
            "augment": {"crop_padding": 2, "hflip": True},
            "many_threshold": 20,
            "few_threshold": 8,
            "ece_bins": 15,
        },
        "seeds": seeds,
        "table": aggregate(finals, methods),
        "runs": [
            {
                "method": f["method"],
                "seed": f["seed"],
                "train_seconds": 2.0,
                "last_epoch": f["last_epoch"],
                "val_selected": None,
                "posthoc": f["posthoc"],
            }
            for f in finals
        ],
    }


def _write_runs(output, finals: list[dict], epochs: int = 3) -> None:
    for f in finals:
        d = output / f["method"] / f"seed{f['seed']}"
        d.mkdir(parents=True)
        final = {"last_epoch": {**f["last_epoch"], "calibration_bins": _bins(f["seed"])}}
        if f["method"] == "gbg":
            final["update_rule_state"] = {"groups": [0, 0, 1, 1]}
        (d / "final.json").write_text(json.dumps(final))
        history = [{"epoch": e, "g": [1.2, 0.9, 0.6, 0.3 + 0.05 * e]} for e in range(1, epochs + 1)]
        (d / "diagnostics.json").write_text(json.dumps({"num_classes": len(COUNTS), "history": history}))


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "g": [1.5 - 0.1 * e, 1.0, 0.7, 0.2 + 0.1 * e]} for e in range(1, epochs + 1)]


# ------------------------------------------------------------------------------------------- figures
@pytest.mark.parametrize("epochs", [1, 2, 3, 12])
def test_epoch_axes_have_integer_ticks(epochs):
    fig = plots.gradient_ratio_figure({"ce": _history(epochs), "la": _history(epochs)}, COUNTS)
    FigureCanvasAgg(fig).draw()
    panels = [ax for ax in fig.axes if ax.get_title() in ("ce", "la")]
    assert len(panels) == 2
    for ax in panels:
        lo, hi = sorted(ax.get_xlim())
        shown = [x for x in ax.xaxis.get_major_locator()() if lo <= x <= hi]
        assert shown, f"no epoch tick in {ax.get_xlim()}"
        assert all(float(x).is_integer() for x in shown), shown


def test_reference_lines_are_named_in_the_legend():
    fig = plots.gradient_ratio_figure({"ce": _history(3)}, COUNTS)
    assert len(fig.legends) == 1
    legend = fig.legends[0]
    texts = [t.get_text() for t in legend.get_texts()]
    panel = next(ax for ax in fig.axes if ax.get_title() == "ce")
    dashed = {line.get_label(): line for line in panel.lines if line.get_linestyle() == "--"}
    assert sorted(dashed) == sorted(texts)  # every dashed line drawn is named in the legend, and only those
    named = {float(line.get_ydata()[0]): label for label, line in dashed.items()}
    assert sorted(named) == [0.5, 1.0]
    assert named[1.0].startswith("g = 1") and "balanced" in named[1.0]
    assert named[0.5].startswith("g = 0.5")
    for handle, text in zip(legend.legend_handles, texts, strict=True):  # legend keys look like the lines
        assert handle.get_color() == dashed[text].get_color() and handle.get_linestyle() == "--"


def _drawn_tick_labels(axis):
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * max(1.0, hi - lo)
    for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
        if tick.get_visible() and lo - tol <= tick.get_loc() <= hi + tol:
            yield from (t for t in (tick.label1, tick.label2) if t.get_visible())


def _text_boxes(fig) -> list[tuple[str, object]]:
    """Every piece of text the figure draws (tick labels in view, axis labels, titles, legends, figure
    labels) with its bounding box in display pixels."""
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            found += [*_drawn_tick_labels(axis), axis.label]
        found += [ax.title, *ax.texts]
        if ax.get_legend() is not None:
            found += ax.get_legend().get_texts()
    found += [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    boxes = []
    for text in dict.fromkeys(found):
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            if box.width > 0 and box.height > 0:
                boxes.append((text.get_text(), box))
    return boxes


def _collisions(fig) -> list[tuple[str, str]]:
    boxes = _text_boxes(fig)
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.padded(1.0).overlaps(box_b.padded(1.0))
    ]


def _long_tail(num_classes: int) -> list[int]:
    return [max(1, round(500 * 100 ** (-j / (num_classes - 1)))) for j in range(num_classes)]


@pytest.mark.parametrize("num_classes,num_methods", [(4, 1), (4, 3), (10, 8), (100, 3)])
def test_figures_have_no_colliding_labels(num_classes, num_methods):
    counts = _long_tail(num_classes)
    names = [f"method_{k}" for k in range(num_methods)]
    acc = [1 - j / num_classes for j in range(num_classes)]
    history = [{"epoch": e, "g": [1 + 0.01 * j for j in range(num_classes)]} for e in (1, 2, 3)]
    figures = {
        "per-class": plots.per_class_accuracy_figure(dict.fromkeys(names, acc), counts),
        "gradient ratio": plots.gradient_ratio_figure(dict.fromkeys(names, history), counts),
        "reliability": plots.reliability_figure({n: _bins(k) for k, n in enumerate(names)}),
        "group map": plots.group_map_figure({n: [j % 3 for j in range(num_classes)] for n in names}, counts),
    }
    for name, fig in figures.items():
        assert _collisions(fig) == [], name
        labels = [text for text, _ in _text_boxes(fig)]
        assert not any("^{" in t for t in labels), f"{name}: log ticks as powers of ten: {labels}"


# ------------------------------------------------------------------------------------------- tables
def test_html_and_markdown_show_the_fitted_posthoc_tau(tmp_path):
    finals = [
        _final("ce", 0, {"posthoc_la": 0.7, "tau_norm": 0.5}),
        _final("ce", 1, {"posthoc_la": 0.8, "tau_norm": 0.5}),
        _final("gbg", 0),
        _final("gbg", 1),
    ]
    _write_runs(tmp_path, finals)
    write_report(_results(finals, [0, 1]), tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    rows = re.findall(r"<tr class='posthoc'>(.*?)</tr>", page)
    la = next(r for r in rows if "ce + posthoc_la" in r)
    assert "τ = 0.75 ± 0.07 [0.7, 0.8]" in la
    norm = next(r for r in rows if "ce + tau_norm" in r)
    assert "τ = 0.5 [every seed]" in norm and "bias_mode = scale" in norm
    assert "<code>bcl</code>" in page  # Markdown code spans in notes are rendered, not shown as backticks
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| ce + posthoc_la (τ = 0.75 ± 0.07 [0.7, 0.8]) |" in md
    # the gradient-ratio figure explains its reference lines
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    g = next(c for c in captions if "P_j" in c)
    assert "g = 1, balanced" in g and "g = 0.5" in g and "Equalization Losses" in g


def test_one_seed_shows_the_single_tau():
    table = aggregate([_final("ce", 3, {"posthoc_la": 1.2})], ["ce"])
    row = next(r for r in table if r["kind"] == "posthoc")
    assert format_params(row["params"]) == "τ = 1.2"
    assert format_params(None) == ""


# ------------------------------------------------------------------------------------------- prose
@pytest.mark.parametrize(
    "warmup,epochs,seeds,expect,reject",
    [
        (
            1,
            1,
            [0],
            ["1 warm-up epoch and", "1 epoch,", "1 seed [0]"],
            ["warm-up epochs", "1 epochs", "seed(s)"],
        ),
        (2, 3, [0, 1], ["2 warm-up epochs and", "3 epochs,", "2 seeds [0, 1]"], ["seed(s)"]),
        (0, 2, [0, 1], ["no warm-up and", "2 epochs,"], ["0 warm-up"]),
    ],
)
def test_protocol_sentences_use_singular_for_one(warmup, epochs, seeds, expect, reject):
    finals = [_final("ce", s) for s in seeds]
    text = protocol_paragraph(_results(finals, seeds, warmup=warmup, epochs=epochs))
    for phrase in expect:
        assert phrase in text, phrase
    for phrase in reject:
        assert phrase not in text, phrase
    assert not re.search(r"\b1 (warm-up epochs|epochs|seeds|images|bins)\b", text)
    assert "(1 image per class)" in text
