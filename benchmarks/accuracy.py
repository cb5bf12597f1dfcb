"""Accuracy study on real Fashion-MNIST, under the reference protocol of filter grafting.

    nice python benchmarks/accuracy.py                  # the study: appends one JSON line per finished run
    nice python benchmarks/accuracy.py --shards=2 --shard=1   # a second process takes the other half of the plan
    python benchmarks/accuracy.py --smoke               # every method path once on a tiny config (about 2 min)
    python benchmarks/accuracy.py --report              # accuracy_summary.json, accuracy.md and plots

Question: do 2-model grafting (the reference protocol), cultivation and our variants beat their baselines by more
than the baseline's spread over seeds, in a regime where grafting's mechanism exists (invalid filters, which weight
decay creates over many SGD steps)? The probe (benchmarks/probe.py, on a validation split carved from the training
images) chose the regime: ResNet-8 width 8, batch 32, so that every model gets >= 20,000 SGD steps at lr 0.1.

Protocol (every method): train on all 60,000 training images, test on all 10,000 test images after every epoch,
*before* that epoch's graft (the reference's train -> test -> save -> graft), no graft after the final epoch. SGD
momentum 0.9, coupled weight decay 5e-4, lr 0.1 divided by 10 at the ``--milestones`` epochs (the reference's step
schedule, shortened: 11 epochs = 20,625 steps at lr 0.1, then 3 at 0.01 and 1 at 0.001), random crop after 4 pixels
of padding + horizontal flip, each model and each epoch its own data order. Seed s fixes model 0's initialisation and
data order in every method, so methods are compared paired by seed.

Methods:

* ``baseline``            one model;
* ``graft2``              2 models, entropy grafting after every epoch, lr spread (model k: lr (1 + cos(pi (N - k) /
  N)) / 2), step schedule: the reference protocol (``grafting.py`` defaults: ``--difflr`` on, no ``--cos``);
* ``graft2_cosine``       as ``graft2`` with cosine annealing instead of the step schedule (the reference's ``--cos``);
* ``graft2_shared_init``  as ``graft2`` with both peers starting from model 0's initialisation (ours: the first graft
  then mixes two related networks instead of averaging two random ones);
* ``ensemble2``           2 independent models (the baseline's protocol each); their ensemble is reported too;
* ``teacher``             a wider network (``--teacher_model``, seed ``--teacher_seed``) trained with the baseline's
  protocol; the one frozen teacher of every seed of:
* ``kd``                  one model + distillation from the teacher (temperature 2, weight 1);
* ``cultivate``           ``graft2`` + distillation from the same teacher (cultivation).

Resumable and restartable: a finished run is one JSON line in ``--output`` (skipped when rerun); a running run
checkpoints every epoch under ``--backup_root`` (GraftTrainer's ``backup_dir``) with its per-epoch rows beside it, so
a killed study rerun with the same command continues inside the interrupted run. ``--runs`` gives two processes
explicit queues (a student waits for a teacher that the other process is training).
"""

import json
import math
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import criteria
from keras_graft import datasets
from keras_graft import experiment
from keras_graft.trainer import GraftTrainer

_HERE = os.path.dirname(os.path.abspath(__file__))
_RESULTS = os.path.join(_HERE, "results")
THRESHOLDS = (0.1, 0.01)
METHODS = ("baseline", "graft2", "graft2_cosine", "graft2_shared_init", "ensemble2", "teacher", "kd", "cultivate")
DISTILLED = ("kd", "cultivate")

flags.DEFINE_list("methods", list(METHODS), f"Methods to run, among {', '.join(METHODS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every method.")
flags.DEFINE_list("more_seeds", ["3", "4"], "Further seeds of the --more_seed_methods (run first with the others).")
flags.DEFINE_list("more_seed_methods", ["baseline", "graft2"], "Methods that also run the --more_seeds.")
flags.DEFINE_string("model", "resnet8_w8", "Network: resnet<depth>_w<width> (CIFAR ResNet, option-A shortcuts).")
flags.DEFINE_string("teacher_model", "resnet8_w16", "Teacher of kd and cultivate (a wider network).")
flags.DEFINE_integer("epochs", 15, "Epochs per model, the same for every method.")
flags.DEFINE_list("milestones", ["11", "14"], "Epochs after which the step schedule divides the lr by 10.")
flags.DEFINE_integer("train_examples", 60000, "Training images (the first N of the training split).")
flags.DEFINE_integer("test_examples", 10000, "Test images (the first N of the test split).")
flags.DEFINE_integer("batch_size", 32, "Batch per model.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay of the models.")
flags.DEFINE_integer("steps_per_execution", 50, "Training steps per compiled call (the same numerics as 1).")
flags.DEFINE_integer("teacher_seed", 0, "Seed of the one teacher that every kd and cultivate seed distils from.")
flags.DEFINE_list("runs", [], "Explicit queue of method:seed (for example teacher:0,kd:0), run in this order instead "
                  "of the plan and its shards.")
flags.DEFINE_integer("teacher_wait_s", 0, "How long a student waits for a teacher that another process trains.")
flags.DEFINE_integer("shards", 1, "Split the plan into this many shards, one process each.")
flags.DEFINE_integer("shard", 0, "The shard this process runs (0-based).")
flags.DEFINE_string("teacher_dir", os.path.join(_RESULTS, "teachers"), "Teachers (.keras), committed with the "
                    "results.")
flags.DEFINE_string("output", os.path.join(_RESULTS, "accuracy_runs.jsonl"), "JSON lines, appended.")
flags.DEFINE_string("backup_root", "/work/keras_graft_study_backup", "Per-run checkpoints; '' disables.")
flags.DEFINE_bool("smoke", False, "Every method once on a tiny config (512 training and 1000 test images, 2 epochs, "
                  "1 seed), written to a temporary file unless --output is given.")
flags.DEFINE_string("repr_output", os.path.join(_RESULTS, "repr_study_test.jsonl"),
                    "Report: RePr's study (benchmarks/repr_study.py --test), added to the summary as its own study.")
flags.DEFINE_bool("report", False, "Write the summary, table and plots from --output instead of training.")
flags.DEFINE_string("summary", os.path.join(_RESULTS, "accuracy_summary.json"), "Report: machine-readable summary.")
flags.DEFINE_string("report_md", os.path.join(_RESULTS, "accuracy.md"), "Report: markdown tables.")
flags.DEFINE_string("report_png", os.path.join(_RESULTS, "accuracy_curves.png"), "Report: per-epoch plots.")
FLAGS = flags.FLAGS


# Configuration.

def config():
    """What makes two runs comparable; part of every record."""
    milestones = [int(m) for m in FLAGS.milestones]
    steps = math.ceil(FLAGS.train_examples / FLAGS.batch_size)
    return {
        "dataset": "fashion_mnist", "train_examples": FLAGS.train_examples, "test_examples": FLAGS.test_examples,
        "model": FLAGS.model, "teacher_model": FLAGS.teacher_model, "epochs": FLAGS.epochs,
        "batch_size": FLAGS.batch_size, "steps_per_epoch": steps, "steps_per_model": steps * FLAGS.epochs,
        "steps_at_initial_lr": steps * milestones[0], "lr": FLAGS.lr, "momentum": 0.9,
        "weight_decay": FLAGS.weight_decay, "milestones": milestones, "image_size": 28,
        "evaluation": "test set after every epoch, before that epoch's graft; no graft after the final epoch",
    }


def config_key(c=None):
    c = c or config()
    return (f"{c['model']}_e{c['epochs']}_m{'-'.join(map(str, c['milestones']))}_n{c['train_examples']}_"
            f"b{c['batch_size']}_lr{c['lr']:g}_wd{c['weight_decay']:g}")


def method_spec(method):
    """(num_models, GraftTrainer keyword arguments) of a method."""
    step = {"name": "step", "milestones": [int(m) for m in FLAGS.milestones]}
    reference = {"grafting": keras_graft.Grafting(), "lr_spread": True, "lr_schedule": step}
    specs = {
        "baseline": (1, {"lr_schedule": step}),
        "graft2": (2, reference),
        "graft2_cosine": (2, {**reference, "lr_schedule": "cosine"}),
        "graft2_shared_init": (2, {**reference, "shared_initialization": True}),
        "ensemble2": (2, {"lr_schedule": step}),
        "teacher": (1, {"lr_schedule": step}),
        "kd": (1, {"lr_schedule": step}),
        "cultivate": (2, reference),
    }
    return specs[method]


def build_fn(name):
    """Builds the network a label names (``resnet8_w8``) for Fashion-MNIST's 28x28x1 images."""
    return experiment.ModelSpec.from_label(name, input_shape=(28, 28, 1), weight_decay=FLAGS.weight_decay).build


def teacher_path(seed=None):
    seed = FLAGS.teacher_seed if seed is None else seed
    return os.path.join(FLAGS.teacher_dir, f"{config_key()}_teacher_{FLAGS.teacher_model}_seed{seed}.keras")


# One run.

def run(method, seed, label):
    num_models, kwargs = method_spec(method)
    record = {"method": method, "seed": int(seed), "num_models": num_models, "config": config(),
              "config_key": config_key()}
    if method in DISTILLED:
        kwargs = dict(kwargs, distillation=keras_graft.Distillation(teachers=[teacher_path()], temperature=2.0,
                                                                    weight=1.0))
        record["teacher_path"] = os.path.relpath(teacher_path(), _HERE)
    backup_dir = os.path.join(FLAGS.backup_root, f"{config_key()}_{method}_seed{seed}") if FLAGS.backup_root else None
    if backup_dir:
        os.makedirs(backup_dir, exist_ok=True)
    resumed = bool(backup_dir and tf.train.latest_checkpoint(backup_dir))
    logging.info("%s: %d model(s), %d epochs%s.", label, num_models, FLAGS.epochs, " (resuming)" if resumed else "")
    trainer = GraftTrainer(
        build_fn(FLAGS.teacher_model if method == "teacher" else FLAGS.model), num_models,
        optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], seed=int(seed),
        backup_dir=backup_dir, steps_per_execution=FLAGS.steps_per_execution, **kwargs)
    train = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size,
                                          base_seed=1_000_003 * int(seed), subset=FLAGS.train_examples)
    test = datasets.load("fashion_mnist_local", "test", batch_size=1000, subset=FLAGS.test_examples)
    epochs = experiment.EpochRecord(trainer, label, os.path.join(backup_dir, "epochs.json") if backup_dir else None)
    start = time.perf_counter()
    trainer.fit(train, epochs=FLAGS.epochs, steps_per_epoch=config()["steps_per_epoch"], validation_data=test,
                callbacks=[epochs], verbose=0)
    rows = epochs.rows
    final = rows[-1]
    record.update({
        "per_epoch": rows, "final_accuracy": final["test_accuracy"],
        "final_ensemble_accuracy": final["test_accuracy_ensemble"],
        "best_accuracy": [max(r["test_accuracy"][k] for r in rows) for k in range(num_models)],
        "best_epoch": [1 + int(np.argmax([r["test_accuracy"][k] for r in rows])) for k in range(num_models)],
        "filters_per_model": criteria.invalid_filters(trainer.models[0], THRESHOLDS[0]).total,
        "seconds_per_epoch": float(np.median([r["seconds"] for r in rows])), "fit_seconds":
        time.perf_counter() - start, "resumed": resumed, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tensorflow": tf.__version__, "keras": keras.__version__,
    })
    for t in THRESHOLDS:
        record[f"invalid_{t:g}"] = final[f"invalid_{t:g}"]
    if method == "teacher":
        os.makedirs(FLAGS.teacher_dir, exist_ok=True)
        trainer.models[0].save(teacher_path(seed) + ".tmp.keras")
        os.replace(teacher_path(seed) + ".tmp.keras", teacher_path(seed))  # never a half-written teacher
    if backup_dir:
        shutil.rmtree(backup_dir, ignore_errors=True)
    keras.backend.clear_session()
    logging.info("%s: final %s, best %s, invalid<0.1 %s of %d.", label, final["test_accuracy"],
                 record["best_accuracy"], record["invalid_0.1"], record["filters_per_model"])
    return record


# The plan.

def plan():
    """Units of work in priority order (the 5-seed pair first); the teacher and its students form one unit."""
    if FLAGS.runs:
        return [[(m, int(s)) for m, s in (run.split(":") for run in FLAGS.runs)]]
    methods = [m for m in METHODS if m in FLAGS.methods]
    more = [m for m in methods if m in FLAGS.more_seed_methods]
    seeds = [int(s) for s in FLAGS.seeds]
    units = [[(m, s)] for s in seeds + [int(x) for x in FLAGS.more_seeds] for m in more]
    for s in seeds:
        units += [[(m, s)] for m in methods if m not in more and m not in DISTILLED + ("teacher",)]
    distilled = [("teacher", FLAGS.teacher_seed)] if "teacher" in methods else []
    distilled += [(m, s) for s in seeds for m in DISTILLED if m in methods]
    if distilled:
        units.append(distilled)
    return units


def shard_of(units):
    """Greedy split of the units over shards by cost (model-runs), the same in every process."""
    load = [0.0] * FLAGS.shards
    owner = []
    for unit in units:
        k = int(np.argmin(load))
        owner.append(k)
        load[k] += sum(method_spec(m)[0] * (2 if m == "teacher" else 1) for m, _ in unit)
    return [unit for unit, k in zip(units, owner) if k == FLAGS.shard]


def study():
    unknown = set(FLAGS.methods) - set(METHODS)
    if unknown:
        raise app.UsageError(f"Unknown methods {sorted(unknown)}; choose among {', '.join(METHODS)}.")
    if not 0 <= FLAGS.shard < FLAGS.shards:
        raise app.UsageError(f"--shard must lie in [0, {FLAGS.shards}), got {FLAGS.shard}.")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    key = config_key()
    bad = [run for run in FLAGS.runs if run.count(":") != 1 or run.split(":")[0] not in METHODS]
    if bad:
        raise app.UsageError(f"--runs takes method:seed with a method among {', '.join(METHODS)}; got {bad}.")
    todo = [(m, s) for unit in (plan() if FLAGS.runs else shard_of(plan())) for m, s in unit]
    logging.info("Study %s, shard %d/%d: %d runs.", key, FLAGS.shard, FLAGS.shards, len(todo))
    for index, (method, seed) in enumerate(todo, 1):
        done = {(r["config_key"], r["method"], r["seed"]) for r in experiment.read_jsonl(FLAGS.output)}
        if (key, method, seed) in done:
            logging.info("[%d/%d] %s seed %d: done already, in %s.", index, len(todo), method, seed, FLAGS.output)
            continue
        deadline = time.time() + FLAGS.teacher_wait_s
        while method in DISTILLED and not os.path.exists(teacher_path()) and time.time() < deadline:
            time.sleep(30)
        if method in DISTILLED and not os.path.exists(teacher_path()):
            raise RuntimeError(f"{method} seed {seed} needs the teacher {teacher_path()}: run the teacher first "
                               "(it comes before its students in the plan), or let --teacher_wait_s wait for it.")
        record = run(method, seed, f"[{index}/{len(todo)}] {method} seed {seed}")
        experiment.append_jsonl(FLAGS.output, record)
    logging.info("Shard %d done: %s.", FLAGS.shard, FLAGS.output)


# The report.

def _mean_std(values):
    values = [float(v) for v in values]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _interval(values):
    """95% confidence interval of the mean (Student's t), or None with fewer than 2 values."""
    if len(values) < 2:
        return None
    mean, std = _mean_std(values)
    half = _T95.get(len(values) - 1, 1.96) * std / math.sqrt(len(values))
    return [mean - half, mean + half]


def summarize(records):
    """{"studies": [...]}: per config, per method: accuracies over seeds and paired differences with baseline."""
    studies = []
    for key in sorted({r["config_key"] for r in records}):
        runs = [r for r in records if r["config_key"] == key]
        by = {(r["method"], r["seed"]): r for r in runs}
        methods = {}
        for method in METHODS:
            mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
            if not mine:
                continue
            final = [float(np.mean(r["final_accuracy"])) for r in mine]
            best = [float(np.mean(r["best_accuracy"])) for r in mine]
            paired = [f - float(np.mean(by[("baseline", r["seed"])]["final_accuracy"]))
                      for f, r in zip(final, mine) if ("baseline", r["seed"]) in by]
            paired_best = [b - float(np.mean(by[("baseline", r["seed"])]["best_accuracy"]))
                           for b, r in zip(best, mine) if ("baseline", r["seed"]) in by]
            filters = mine[0]["filters_per_model"]
            entry = {
                "models": mine[0]["num_models"], "seeds": [r["seed"] for r in mine],
                "final_per_seed": final, "final_mean": _mean_std(final)[0], "final_std": _mean_std(final)[1],
                "best_per_seed": best, "best_mean": _mean_std(best)[0], "best_std": _mean_std(best)[1],
                "invalid_ratio_final": float(np.mean([c for r in mine for c in r["invalid_0.1"]])) / filters,
                "invalid_ratio_final_0.01": float(np.mean([c for r in mine for c in r["invalid_0.01"]])) / filters,
                "filters_per_model": filters,
                "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in mine])),
            }
            if method != "baseline":
                entry.update({"paired_final_mean": _mean_std(paired)[0], "paired_final_std": _mean_std(paired)[1],
                              "paired_final_ci95": _interval(paired), "paired_best_mean": _mean_std(paired_best)[0],
                              "paired_best_std": _mean_std(paired_best)[1]})
            if entry["models"] > 1:
                ensemble = [r["final_ensemble_accuracy"] for r in mine]
                entry["ensemble_final_mean"], entry["ensemble_final_std"] = _mean_std(ensemble)
            if method in DISTILLED:
                other = "baseline" if method == "kd" else "graft2"
                diffs = [float(np.mean(r["final_accuracy"])) - float(np.mean(by[(other, r["seed"])]["final_accuracy"]))
                         for r in mine if (other, r["seed"]) in by]
                entry[f"paired_final_vs_{other}"] = _mean_std(diffs)
            methods[method] = entry
        if "kd" in methods and "cultivate" in methods:
            seeds = [s for s in methods["cultivate"]["seeds"] if ("kd", s) in by]
            diffs = [float(np.mean(by[("cultivate", s)]["final_accuracy"])) - float(np.mean(by[("kd", s)][
                "final_accuracy"])) for s in seeds]
            methods["cultivate"]["paired_final_vs_kd"] = _mean_std(diffs)
        studies.append({"config": {**runs[0]["config"], "config_key": key}, "methods": methods})
    return {"studies": studies}


def summarize_repr(records):
    """RePr's study (benchmarks/repr_study.py --test) in the summary's shape: final = test accuracy after the
    last epoch; its per-epoch curves are on the validation split, so ``best_*`` is the best validation epoch."""
    records = [r for r in records if "test_accuracy" in r]
    if not records:
        return []
    config = records[0]["config"]
    records = [r for r in records if r["config"]["key"] == config["key"]]
    by = {(r["method"], r["seed"]): r for r in records}
    methods = {}
    for method in ("baseline", "repr"):
        mine = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        final = [r["test_accuracy"] for r in mine]
        best = [r["best_val_accuracy"] for r in mine]
        entry = {"models": 1, "seeds": [r["seed"] for r in mine], "final_per_seed": final,
                 "final_mean": _mean_std(final)[0], "final_std": _mean_std(final)[1], "best_is": "validation",
                 "best_mean": _mean_std(best)[0], "best_std": _mean_std(best)[1], "invalid_ratio_final": None,
                 "seconds_per_epoch": float(np.mean([r["seconds_per_epoch_median"] for r in mine]))}
        if method == "repr":
            paired = [r["test_accuracy"] - by[("baseline", r["seed"])]["test_accuracy"] for r in mine
                      if ("baseline", r["seed"]) in by]
            entry.update({"paired_final_mean": _mean_std(paired)[0], "paired_final_std": _mean_std(paired)[1],
                          "paired_final_ci95": _interval(paired)})
        methods[method] = entry
    return [{"config": {**config, "config_key": config["key"], "dataset": "fashion_mnist",
                        "evaluation": "test set once after the last epoch; settings chosen on train[55000:]"},
             "methods": methods}]


def _pct(mean, std=None):
    if mean is None:
        return "-"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def markdown(summary):
    lines = []
    for study_ in summary["studies"]:
        c = study_["config"]
        if "steps_per_model" not in c:  # RePr's study
            lines += [f"### RePr: {c['model']}, {c['train_subset']} training images, {c['epochs']} epochs", "",
                      f"Settings: `{json.dumps({k: v for k, v in c.items() if k not in ('key', 'config_key')})}`. "
                      "Test accuracy (%) after the last epoch (settings chosen on a validation split); best = best "
                      "validation epoch.", "",
                      "| method | seeds | final (test) | per seed | paired (95% CI) | best (validation) | s/epoch |",
                      "|---|---|---|---|---|---|---|"]
            for name, m in study_["methods"].items():
                ci = m.get("paired_final_ci95")
                paired = "-" if name == "baseline" else (
                    _pct(m["paired_final_mean"], m["paired_final_std"])
                    + (f" ({100 * ci[0]:+.2f}, {100 * ci[1]:+.2f})" if ci else ""))
                per_seed = ", ".join(f"{100 * a:.2f}" for a in m["final_per_seed"])
                lines.append(f"| {name} | {len(m['seeds'])} | {_pct(m['final_mean'], m['final_std'])} | {per_seed} | "
                             f"{paired} | {_pct(m['best_mean'], m['best_std'])} | {m['seconds_per_epoch']:.1f} |")
            lines.append("")
            continue
        lines += [f"### `{c['config_key']}`", "",
                  f"{c['model']}, {c['train_examples']} training images, batch {c['batch_size']}, {c['epochs']} "
                  f"epochs ({c['steps_per_model']} steps per model, {c['steps_at_initial_lr']} at lr {c['lr']}), "
                  f"lr / 10 after epochs {c['milestones']}. Test accuracy (%) on {c.get('test_examples', 10000)} test images: final = "
                  "last epoch, best = best epoch (as the papers report), both the mean over a run's models, then "
                  "mean ± std over seeds; paired = minus the baseline of the same seed.", "",
                  "| method | models | seeds | final | best | paired final (95% CI) | paired best | ensemble final "
                  "| invalid <0.1 | invalid <0.01 | s/epoch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in study_["methods"].items():
            ci = m.get("paired_final_ci95")
            paired = "-" if name == "baseline" else (
                f"{_pct(m['paired_final_mean'], m['paired_final_std'])}"
                + (f" ({100 * ci[0]:+.2f}, {100 * ci[1]:+.2f})" if ci else ""))
            best_paired = "-" if name == "baseline" else _pct(m["paired_best_mean"], m["paired_best_std"])
            lines.append(
                f"| {name} | {m['models']} | {len(m['seeds'])} | {_pct(m['final_mean'], m['final_std'])} | "
                f"{_pct(m['best_mean'], m['best_std'])} | {paired} | {best_paired} | "
                f"{_pct(m.get('ensemble_final_mean'), m.get('ensemble_final_std'))} | "
                f"{100 * m['invalid_ratio_final']:.1f}% | {100 * m['invalid_ratio_final_0.01']:.1f}% | "
                f"{m['seconds_per_epoch']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = max({r["config_key"] for r in records}, key=lambda k: sum(r["config_key"] == k for r in records))
    runs = [r for r in records if r["config_key"] == key]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    styles = {"baseline": "k", "graft2": "tab:red", "ensemble2": "tab:blue", "graft2_shared_init": "tab:orange",
              "graft2_cosine": "tab:purple", "cultivate": "tab:green", "kd": "tab:olive"}
    for method, color in styles.items():
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        epochs = np.arange(1, len(mine[0]["per_epoch"]) + 1)
        accuracy = np.mean([[np.mean(row["test_accuracy"]) for row in r["per_epoch"]] for r in mine], axis=0)
        axes[0].plot(epochs, 100 * accuracy, color=color, label=f"{method} (n={len(mine)})")
        if method == "ensemble2":
            ensemble = np.mean([[row["test_accuracy_ensemble"] for row in r["per_epoch"]] for r in mine], axis=0)
            axes[0].plot(epochs, 100 * ensemble, color=color, linestyle="--", label="ensemble2, ensemble")
        invalid = np.mean([[np.mean(row["invalid_0.1"]) for row in r["per_epoch"]] for r in mine], axis=0)
        axes[1].plot(epochs, 100 * invalid / mine[0]["filters_per_model"], color=color, label=method)
        if "peer_distance" in mine[0]["per_epoch"][0]:
            distance = np.mean([[row["peer_distance"] for row in r["per_epoch"]] for r in mine], axis=0)
            axes[2].plot(epochs, distance, color=color, label=method)
    axes[0].set(title="test accuracy per epoch (before the graft), mean over seeds", xlabel="epoch",
                ylabel="accuracy (%)")
    axes[0].set_ylim(bottom=max(0, axes[0].get_ylim()[0]))
    axes[1].set(title="invalid filters (L1 < 0.1) per model", xlabel="epoch", ylabel="% of filters")
    axes[2].set(title="peers' distance ||W0 - W1|| / ||W0|| before the graft", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Fashion-MNIST, {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report():
    records = experiment.read_jsonl(FLAGS.output)
    if not records:
        raise app.UsageError(f"No results in {FLAGS.output}.")
    summary = summarize(records)
    summary["studies"] += summarize_repr(experiment.read_jsonl(FLAGS.repr_output))
    for path, text in ((FLAGS.summary, json.dumps(summary, indent=1)), (FLAGS.report_md, markdown(summary))):
        with open(path, "w") as f:
            f.write(text + "\n")
    plot(records, FLAGS.report_png)
    print(markdown(summary))


def apply_smoke():
    """The tiny configuration. Its default files (in /tmp) start afresh on every training run; an explicit
    --output or --teacher_dir is kept, so a rerun skips the runs already there."""
    FLAGS.seeds, FLAGS.more_seeds = ["0"], []
    FLAGS.train_examples, FLAGS.test_examples, FLAGS.epochs, FLAGS.milestones = 512, 1000, 2, ["1"]
    defaulted = []
    for flag, path in (("output", "/tmp/keras_graft_accuracy_smoke.jsonl"),
                       ("summary", "/tmp/keras_graft_accuracy_smoke_summary.json"),
                       ("report_md", "/tmp/keras_graft_accuracy_smoke.md"),
                       ("report_png", "/tmp/keras_graft_accuracy_smoke.png"),
                       ("teacher_dir", "/tmp/keras_graft_accuracy_smoke_teachers"),
                       ("repr_output", "/tmp/keras_graft_accuracy_smoke_repr.jsonl")):
        if not FLAGS[flag].present:
            FLAGS[flag].value = path
            defaulted.append(flag)
    if not FLAGS["backup_root"].present:
        FLAGS.backup_root = ""
    if not FLAGS.report:
        for path in (FLAGS[flag].value for flag in ("output", "teacher_dir") if flag in defaulted):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def main(argv):
    del argv
    if FLAGS.smoke:
        apply_smoke()
    if FLAGS.report:
        report()
    else:
        study()


if __name__ == "__main__":
    app.run(main)
