"""Filter plots of trained models: per-filter L1 norms, invalid filters per layer, accuracy curves from CSV logs.

Needs matplotlib (``pip install -e '.[plots]'``), imported only by :func:`plot_filters`.
"""

import csv
import json
import os
import re
import textwrap

import numpy as np

from keras_graft import criteria
from keras_graft import layouts
from keras_graft.experiment import RESULTS_FILE
from keras_graft.experiment import THRESHOLDS


def load_results_near(weights_path):
    """The results JSON in the folder of a weights file, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), RESULTS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def filter_norms(model):
    """[(layer name, per-filter L1 norms as a NumPy array)] for every convolution layer of ``model``."""
    out = []
    for layer in layouts.filter_layers(model):
        kernel, axes = layouts.primary_kernel(layer)
        out.append((layer.name, criteria.l1_norm(kernel, per_filter=True, filter_axes=axes).numpy()))
    return out


def read_csv_log(path):
    """{column: [floats]} of a Keras CSVLogger file (non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def _accuracy_columns(columns):
    """[(column, is_ensemble)] to plot: test (val_) accuracies per model and ensemble, else training accuracy."""
    for prefix in ("val_accuracy", "accuracy"):
        per_model = sorted((c for c in columns if re.fullmatch(rf"{prefix}_\d+", c)),
                           key=lambda c: int(c.split("_")[-1]))
        picked = [(c, False) for c in per_model] or ([(prefix, False)] if prefix in columns else [])
        if picked:
            if f"{prefix}_ensemble" in columns and len(per_model) > 1:
                picked.append((f"{prefix}_ensemble", True))
            return prefix, picked
    return None, []


def plot_filters(entries, output, logs=(), threshold=0.1, title=None, summary=None, curves_note=None):
    """Writes a PNG comparing the filters of several trained models.

    Panels: (a) histogram of every convolution filter's L1 norm per model (log scale, invalid thresholds 0.1 and
    0.01 marked); (b) the same distributions as violins; (c) per layer, the median and the smallest filter L1 norm;
    (d) invalid filters (L1 norm < ``threshold``) per layer; (e) accuracy curves from training logs; (f) a summary.

    Args:
      entries: [(label, [(layer, L1 norms)])], e.g. from :func:`filter_norms`.
      output: PNG path.
      logs: [(label, CSV path)] of training logs (Keras CSVLogger, e.g. train.py's log.csv) for the curves.
      threshold: the L1 norm below which a filter counts as invalid, for the per-layer bars.
      title: figure title.
      summary: extra text lines for the summary panel (e.g. test accuracies).
      curves_note: a note written under the accuracy curves (e.g. why some of them coincide).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not entries:
        raise ValueError("plot_filters needs at least one model.")
    logs = [(label, path) for label, path in logs if path and os.path.isfile(path)]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    (ax_hist, ax_violin, ax_layers), (ax_invalid, ax_curves, ax_text) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = [colors[i % len(colors)] for i in range(len(entries))]
    flat = [np.concatenate([n for _, n in layers]) for _, layers in entries]
    everything = np.concatenate(flat)
    positive = everything[everything > 0]
    low = min(positive.min() if positive.size else 1e-3, min(THRESHOLDS)) / 2
    high = max(everything.max(), 1.0) * 1.5
    bins = np.geomspace(low, high, 60)

    def thresholds(ax, vertical):
        for t, style in zip(THRESHOLDS, ("--", ":")):
            line = ax.axvline if vertical else ax.axhline
            line(t, color="k", linestyle=style, linewidth=1, label=f"L1 = {t:g}")

    # (a) Histogram of all filters.
    for i, ((label, _), norms) in enumerate(zip(entries, flat)):
        ax_hist.hist(np.clip(norms, low, None), bins=bins, histtype="step", linewidth=1.6, color=color[i],
                     label=f"{label}: {int(np.sum(norms < THRESHOLDS[0]))} below {THRESHOLDS[0]:g}")
    thresholds(ax_hist, vertical=True)
    ax_hist.set_xscale("log")
    ax_hist.set_xlabel("filter L1 norm (log scale)")
    ax_hist.set_ylabel("filters")
    ax_hist.set_title("(a) L1 norms of all convolution filters")
    ax_hist.legend(fontsize=7)

    # (b) Violins per model.
    parts = ax_violin.violinplot([np.maximum(norms, low) for norms in flat], showmedians=True)
    for i, body in enumerate(parts["bodies"]):
        body.set_facecolor(color[i])
        body.set_alpha(0.5)
    ax_violin.set_yscale("log")
    thresholds(ax_violin, vertical=False)
    ax_violin.set_xticks(range(1, len(entries) + 1), [label for label, _ in entries], rotation=15)
    ax_violin.set_ylabel("filter L1 norm (log scale)")
    ax_violin.set_title("(b) Distribution per model")

    # (c) Per layer: median and smallest L1 norm.
    for i, (label, layers) in enumerate(entries):
        x = np.arange(len(layers))
        ax_layers.plot(x, [np.median(n) for _, n in layers], color=color[i], marker="o", markersize=3,
                       label=f"{label} median")
        ax_layers.plot(x, [max(n.min(), low) for _, n in layers], color=color[i], linestyle="--", marker="v",
                       markersize=3, label=f"{label} smallest")
    thresholds(ax_layers, vertical=False)
    ax_layers.set_yscale("log")
    ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layers.set_xlabel("convolution layer (input to output)")
    ax_layers.set_ylabel("filter L1 norm (log scale)")
    ax_layers.set_title("(c) Filter L1 norms per layer")
    ax_layers.legend(fontsize=7, ncol=2)

    # (d) Invalid filters per layer.
    width = 0.8 / len(entries)
    layers_max = max(len(layers) for _, layers in entries)
    any_invalid = False
    for i, (label, layers) in enumerate(entries):
        invalid = [int(np.sum(n < threshold)) for _, n in layers]
        any_invalid |= any(invalid)
        x = np.arange(len(layers)) + (i - (len(entries) - 1) / 2) * width
        ax_invalid.bar(x, invalid, width=width, color=color[i], label=f"{label} (total {sum(invalid)})")
    ax_invalid.set_xlim(-1, layers_max)
    ax_invalid.set_ylim(0, None if any_invalid else 1)
    if not any_invalid:
        ax_invalid.text(0.5, 0.5, f"no filter has an L1 norm below {threshold:g}", ha="center", va="center",
                        transform=ax_invalid.transAxes)
    ax_invalid.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_invalid.set_xlabel("convolution layer (input to output)")
    ax_invalid.set_ylabel("invalid filters")
    ax_invalid.set_title(f"(d) Invalid filters per layer (L1 < {threshold:g})")
    ax_invalid.legend(fontsize=7)

    # (e) Accuracy curves.
    ylabel = None
    for i, (label, path) in enumerate(logs):
        columns = read_csv_log(path)
        prefix, picked = _accuracy_columns(columns)
        if not picked:
            continue
        epochs = [e + 1 for e in columns.get("epoch", range(len(columns[picked[0][0]])))]
        for j, (column, ensemble) in enumerate(picked):
            which = "ensemble" if ensemble else (f"model {column.rsplit('_', 1)[-1]}" if column[-1].isdigit() else "")
            ax_curves.plot(epochs, [100 * v for v in columns[column]], color=colors[i % len(colors)],
                           linestyle="--" if ensemble else ("-", "-.", ":")[j % 3], marker="o", markersize=3,
                           label=f"{label} {which}".strip())
        ylabel = ("test" if prefix == "val_accuracy" else "training") + " accuracy (%)"
    if ylabel:
        ax_curves.set_ylabel(ylabel)
        ax_curves.set_xlabel("epoch")
        ax_curves.legend(fontsize=7)
    else:
        ax_curves.text(0.5, 0.5, "no training logs given", ha="center", va="center", transform=ax_curves.transAxes)
    ax_curves.set_title("(e) Accuracy during training")
    if curves_note and ylabel:
        ax_curves.text(0.02, 0.02, textwrap.fill(curves_note, 70), ha="left", va="bottom", fontsize=7,
                       transform=ax_curves.transAxes, bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))

    # (f) Summary.
    lines = []
    for (label, layers), norms in zip(entries, flat):
        counts = ", ".join(f"{int(np.sum(norms < t))} < {t:g}" for t in THRESHOLDS)
        lines.append(f"{label}: {norms.size} filters in {len(layers)} layers; invalid {counts}")
    lines += list(summary or [])
    ax_text.axis("off")
    ax_text.set_title("(f) Summary")
    ax_text.text(0.0, 1.0, "\n".join(lines), ha="left", va="top", family="monospace", fontsize=8,
                 transform=ax_text.transAxes, wrap=True)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
