"""Accuracy study on real Fashion-MNIST: baseline, grafting variants, ensemble, RePr, scions, distillation.

    python benchmarks/accuracy.py                 # the study: every method x every seed, appends JSON lines
    python benchmarks/accuracy.py --smoke         # every method path once on a tiny config (seconds per method)
    python benchmarks/accuracy.py --report        # table (markdown) + bar plot from the JSON lines

Every method trains CIFAR-style ResNets (``keras_graft.models.cifar_resnet``, option-A shortcuts, coupled weight
decay 5e-4) on the native 28x28x1 images of the local Fashion-MNIST IDX files, inside one
``keras_graft.trainer.GraftTrainer`` training loop, so that every method runs the same compiled step, the same data
pipeline (random crop after 4 pixels of padding + horizontal flip, each model its own order) and the same
schedule: SGD lr 0.1, momentum 0.9, batch 128, cosine annealing per step over ``--epochs`` epochs per model.
What changes between methods is only the method:

* ``baseline``        one model;
* ``graft2``          2 models grafting every epoch (entropy criterion), same learning rate;
* ``graft2_spread``   2 models grafting, learning rates spread lr_k = lr (1 + cos(pi (N - k) / N)) / 2;
* ``graft3``          3 models grafting in a ring;
* ``ensemble2``       2 independent models (no grafting); the ensemble (mean probabilities) is reported too;
* ``graft2_l1``       as ``graft2`` with the L1 criterion instead of entropy;
* ``repr``            one model with the RePr callback (``--repr_s1/--repr_s2/--repr_cycles``, epochs);
* ``noise_scion``     one model, Gaussian noise grafted into its invalid filters every epoch (NoiseScion);
* ``internal_scion``  one model, its largest filters grafted into its smallest every epoch (InternalScion);
* ``teacher``         the frozen teacher of ``kd`` and ``cultivate``: one wider/deeper network
  (``--teacher_depth``/``--teacher_width``, ResNet-14 width 8 by default, ~2x a baseline run) trained per seed with
  the same protocol (same data order as model 0, same schedule and epochs), saved to
  ``--teacher_dir``/<config>_<teacher>_seed<s>.keras (gitignored) and recorded like the other methods;
* ``kd``              one model + distillation from the seed's teacher (``keras_graft.Distillation``, temperature
  ``--kd_temperature``, weight ``--kd_weight``), no grafting: the knowledge-distillation baseline;
* ``cultivate``       as ``graft2`` (2 models, entropy grafting every epoch, same lr) + distillation from the
  seed's teacher: cultivation;
* ``mutual``          2 models, deep mutual learning (``Distillation([], mutual=True)``, ``data_order="shared"``:
  both models see model 0's batches), no grafting.

A teacher missing from ``--teacher_dir`` when ``kd`` or ``cultivate`` needs it is trained first (its JSON line is
written once; a retrained teacher's own test accuracy is stored in the runs that use it, ``teacher_accuracy``).

Each finished run appends one JSON line to ``--output``: method, seed, the config, per-model and ensemble test
accuracy, invalid filters (L1 norm < 0.1 and < 0.01, ``criteria.invalid_filters``) per model, seconds per epoch.

Resumable: runs already in ``--output`` with the same config are skipped; each running run checkpoints every
epoch under ``--backup_root`` (GraftTrainer's ``backup_dir``), so a killed study restarted with the same command
continues inside the interrupted run (RePr's schedule and dropped filters are in the checkpoint too). Runs go
seed by seed (all methods of seed 0, then seed 1, ...), so a partial study compares methods
on the same seeds.
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
from keras_graft import models
from keras_graft.trainer import GraftTrainer

METHODS = ("baseline", "graft2", "graft2_spread", "graft3", "ensemble2", "graft2_l1", "repr", "noise_scion",
           "internal_scion", "teacher", "kd", "cultivate", "mutual")
DISTILLED = ("kd", "cultivate")  # the methods that learn from the seed's teacher
THRESHOLDS = (0.1, 0.01)
_HERE = os.path.dirname(os.path.abspath(__file__))

flags.DEFINE_list("methods", list(METHODS), f"Methods to run, among {', '.join(METHODS)}.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; each method runs once per seed.")
flags.DEFINE_integer("depth", 8, "CIFAR ResNet depth (6n + 2).")
flags.DEFINE_integer("width", 8, "Filters of the first stage (16 in the paper).")
flags.DEFINE_integer("epochs", 12, "Epochs per model, the same for every method.")
flags.DEFINE_integer("train_subset", 8192, "First N training images (fixed subset); 0: all 60000.")
flags.DEFINE_integer("batch_size", 128, "Batch per model.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate (cosine annealing per step to 0).")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay of the models.")
flags.DEFINE_integer("image_size", 28, "28: native Fashion-MNIST; 32: zero-padded to CIFAR's size.")
flags.DEFINE_integer("repr_s1", 2, "RePr: epochs of full training before each drop.")
flags.DEFINE_integer("repr_s2", 1, "RePr: epochs with the dropped filters held at zero.")
flags.DEFINE_integer("repr_cycles", 3, "RePr: drop/re-initialise cycles.")
flags.DEFINE_float("repr_prune_ratio", 0.3, "RePr: share of filters dropped per cycle.")
flags.DEFINE_integer("teacher_depth", 14, "Teacher of kd/cultivate: CIFAR ResNet depth.")
flags.DEFINE_integer("teacher_width", 8, "Teacher of kd/cultivate: filters of the first stage.")
flags.DEFINE_string("teacher_dir", os.path.join(_HERE, "results", "teachers"),
                    "Teachers (.keras), one per config and seed; gitignored.")
flags.DEFINE_float("kd_temperature", 2.0, "Distillation temperature (kd, cultivate, mutual).")
flags.DEFINE_float("kd_weight", 1.0, "Distillation weight (kd, cultivate, mutual).")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "accuracy.jsonl"), "JSON lines, appended.")
flags.DEFINE_string("backup_root", "/tmp/keras_graft_accuracy_backup",
                    "Per-run checkpoints for resuming a killed run mid-run; '' disables.")
flags.DEFINE_bool("smoke", False, "Every method once on a tiny config (1 seed, 512 images, 1 epoch), written to "
                  "a temporary file unless --output is given explicitly.")
flags.DEFINE_bool("report", False, "Write the summary table and the plot from --output instead of training.")
flags.DEFINE_string("report_md", os.path.join(_HERE, "results", "accuracy.md"), "Report: markdown table.")
flags.DEFINE_string("report_png", os.path.join(_HERE, "results", "accuracy.png"), "Report: bar plot.")

FLAGS = flags.FLAGS


# Configuration.

def _config():
    return {
        "dataset": "fashion_mnist_local", "model": f"resnet{FLAGS.depth}_w{FLAGS.width}", "epochs": FLAGS.epochs,
        "train_subset": FLAGS.train_subset or 60000, "batch_size": FLAGS.batch_size, "lr": FLAGS.lr,
        "weight_decay": FLAGS.weight_decay, "image_size": FLAGS.image_size, "schedule": "cosine",
    }


def _apply_smoke():
    FLAGS.seeds = ["0"]
    FLAGS.train_subset = 512
    FLAGS.epochs = 1
    if not FLAGS["output"].present:
        FLAGS.output = "/tmp/keras_graft_accuracy_smoke.jsonl"
        if os.path.exists(FLAGS.output):
            os.remove(FLAGS.output)
    if not FLAGS["backup_root"].present:
        FLAGS.backup_root = ""
    if not FLAGS["teacher_dir"].present:
        FLAGS.teacher_dir = "/tmp/keras_graft_accuracy_smoke_teachers"
        shutil.rmtree(FLAGS.teacher_dir, ignore_errors=True)


def _method_spec(method):
    """(num_models, GraftTrainer kwargs, description) of a method."""
    specs = {
        "baseline": (1, {}, "1 model"),
        "graft2": (2, {"grafting": keras_graft.Grafting()}, "2 models, entropy grafting, same lr"),
        "graft2_spread": (2, {"grafting": keras_graft.Grafting(), "lr_spread": True},
                          "2 models, entropy grafting, lr spread"),
        "graft3": (3, {"grafting": keras_graft.Grafting()}, "3 models, entropy grafting in a ring"),
        "ensemble2": (2, {}, "2 independent models (+ their ensemble)"),
        "graft2_l1": (2, {"grafting": keras_graft.Grafting(criterion="l1")}, "2 models, L1 grafting"),
        "repr": (1, {}, "1 model + RePr"),
        "noise_scion": (1, {}, "1 model + NoiseScion(0.1)"),
        "internal_scion": (1, {}, "1 model + InternalScion(0.1)"),
        "teacher": (1, {}, f"teacher, resnet{FLAGS.teacher_depth}_w{FLAGS.teacher_width}"),
        "kd": (1, {}, "1 model + distillation from the teacher"),
        "cultivate": (2, {"grafting": keras_graft.Grafting()}, "2 models, entropy grafting + distillation from "
                      "the teacher"),
        "mutual": (2, {"data_order": "shared"}, "2 models, deep mutual learning, shared data order"),
    }
    return specs[method]


# Data.

class _Data:
    """Training pipelines per (model, epoch) and the test set, read once from the IDX files."""

    def __init__(self, seed):
        subset = FLAGS.train_subset or None
        image_size = None if FLAGS.image_size == 28 else FLAGS.image_size
        self._fn = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size,
                                                 base_seed=1_000_003 * int(seed), subset=subset,
                                                 image_size=image_size)
        self.examples = subset or 60000
        self.steps = math.ceil(self.examples / FLAGS.batch_size)
        self.test = datasets.load("fashion_mnist_local", "test", batch_size=1000, image_size=image_size)

    def train_fn(self, model_index, input_context, epoch=0):
        # per_model_dataset_fn seeds model k's shuffle and augmentation with base_seed + k; a fresh pipeline per
        # epoch with that seed would repeat the same order every epoch, so the "model index" passed on mixes in
        # the epoch: every (model, epoch) gets its own order, reproducible for a resumed epoch.
        return self._fn(int(model_index) + 64 * int(epoch), input_context)


# Callbacks.

class _Progress(keras.callbacks.Callback):
    """Logs every epoch (loss, accuracy, graft alpha, seconds) and keeps the epochs' wall times."""

    def __init__(self, label, epochs):
        super().__init__()
        self.label = label
        self.epochs = epochs
        self.times = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self.times.append(seconds)
        logs = logs or {}
        extra = "".join(f" {key}={logs[key]:.3g}" for key in ("graft_alpha", "scion_filters", "repr_dropped")
                        if key in logs)
        logging.info("%s epoch %d/%d: loss %.4f accuracy %.4f%s (%.1f s)", self.label, epoch + 1, self.epochs,
                     logs.get("loss", float("nan")), logs.get("accuracy", float("nan")), extra, seconds)


class _ScionCallback(keras.callbacks.Callback):
    """Runs a scion round on every model of a trainer at the end of each epoch (what Grafting(peers=scion) does
    in model.fit); adds ``scion_filters`` (filters grafted this round) to the logs."""

    def __init__(self, scion, models_):
        super().__init__()
        self.scion = scion
        self.models_ = models_
        self.grafted = 0

    def on_epoch_end(self, epoch, logs=None):
        filters = sum(self.scion.apply(model, epoch).filters for model in self.models_)
        self.grafted += filters
        if logs is not None:
            logs["scion_filters"] = filters


# One run.

def _build_model_fn(depth=None, width=None):
    shape = (FLAGS.image_size, FLAGS.image_size, 1)
    depth, width = depth or FLAGS.depth, width or FLAGS.width
    return lambda: models.cifar_resnet(depth, width=width, num_classes=10, input_shape=shape,
                                       weight_decay=FLAGS.weight_decay)


def _teacher_model_name():
    return f"resnet{FLAGS.teacher_depth}_w{FLAGS.teacher_width}"


def _teacher_path(seed):
    return os.path.join(FLAGS.teacher_dir, f"{_config_key()}_teacher_{_teacher_model_name()}_seed{seed}.keras")


def _distillation(method, seed):
    """GraftTrainer's ``distillation`` for a method (None for the methods without) and the record's fields."""
    if method in DISTILLED:
        path = _teacher_path(seed)
        info = {"teacher_model": _teacher_model_name(), "teacher_path": os.path.relpath(path, _HERE)}
        return keras_graft.Distillation(teachers=[path], temperature=FLAGS.kd_temperature,
                                        weight=FLAGS.kd_weight), info
    if method == "mutual":
        return keras_graft.Distillation([], mutual=True, temperature=FLAGS.kd_temperature,
                                        weight=FLAGS.kd_weight), {}
    return None, {}


def _teacher_accuracy(path, data):
    teacher = keras.saving.load_model(path, compile=False)
    correct = total = 0
    for x, y in data.test:
        predictions = np.argmax(keras.ops.convert_to_numpy(teacher(x, training=False)), axis=-1)
        correct += int(np.sum(predictions == np.asarray(y).reshape(-1)))
        total += len(predictions)
    return correct / total


def _run(method, seed, data, index, total):
    num_models, kwargs, description = _method_spec(method)
    distillation, extra = _distillation(method, seed)
    if distillation is not None:
        kwargs = dict(kwargs, distillation=distillation)
        extra["distillation"] = {"temperature": distillation.temperature, "weight": distillation.weight,
                                 "mutual": distillation.mutual}
        if method in DISTILLED:
            extra["teacher_accuracy"] = _teacher_accuracy(_teacher_path(seed), data)
    if method == "teacher":
        extra["teacher_model"] = _teacher_model_name()
    label = f"[{index}/{total}] {method} seed {seed}"
    backup_dir = None
    if FLAGS.backup_root:
        backup_dir = os.path.join(FLAGS.backup_root, f"{method}_seed{seed}_" + _config_key())
    resumed = bool(backup_dir and tf.train.latest_checkpoint(backup_dir))
    logging.info("%s: %s, %d epochs of %d images%s.", label, description, FLAGS.epochs, data.examples,
                 " (resuming from its checkpoint)" if resumed else "")
    model_fn = (_build_model_fn(FLAGS.teacher_depth, FLAGS.teacher_width) if method == "teacher"
                else _build_model_fn())
    trainer = GraftTrainer(model_fn, num_models=num_models,
                           optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=0.9),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                           lr_schedule="cosine", seed=int(seed), backup_dir=backup_dir, **kwargs)
    progress = _Progress(label, FLAGS.epochs)
    callbacks = []
    if method == "repr":
        s1, s2, cycles, unit = FLAGS.repr_s1, FLAGS.repr_s2, FLAGS.repr_cycles, "epoch"
        if FLAGS.smoke:  # One epoch: count steps instead, so that drop, hold and re-initialisation all run.
            s1, s2, cycles, unit = 1, 1, 1, "step"
        repr_cb = keras_graft.RePr(s1=s1, s2=s2, prune_ratio=FLAGS.repr_prune_ratio, cycles=cycles, unit=unit,
                                   seed=int(seed))
        repr_cb.models, repr_cb.optimizers = trainer.models, trainer.optimizers
        callbacks.append(repr_cb)
        extra["repr"] = {"s1": s1, "s2": s2, "cycles": cycles, "unit": unit, "prune_ratio": FLAGS.repr_prune_ratio}
    elif method in ("noise_scion", "internal_scion"):
        scion = (keras_graft.NoiseScion(threshold=0.1, seed=int(seed)) if method == "noise_scion"
                 else keras_graft.InternalScion(threshold=0.1))
        scion_cb = _ScionCallback(scion, trainer.models)
        callbacks.append(scion_cb)
    callbacks.append(progress)

    start = time.perf_counter()
    history = trainer.fit(data.train_fn, epochs=FLAGS.epochs, steps_per_epoch=data.steps, callbacks=callbacks,
                          verbose=0)
    fit_seconds = time.perf_counter() - start
    results = trainer.evaluate(data.test)
    accuracies = [results[f"accuracy_{k}"] for k in range(num_models)]
    record = {
        "method": method, "seed": int(seed), "num_models": num_models, "config": _config(),
        "config_key": _config_key(), "accuracy": accuracies, "mean_accuracy": float(np.mean(accuracies)),
        "ensemble_accuracy": results["accuracy_ensemble"], "test_loss": [results[f"loss_{k}"] for k in
                                                                         range(num_models)],
        "train_accuracy_last_epoch": history.history.get("accuracy", [None])[-1] if history else None,
    }
    for threshold in THRESHOLDS:
        reports = [criteria.invalid_filters(model, threshold) for model in trainer.models]
        record[f"invalid_{threshold:g}"] = [r.invalid for r in reports]
        record["filters_per_model"] = reports[0].total
    times = progress.times
    record.update({
        "epochs_timed": len(times), "seconds_per_epoch": float(np.mean(times)) if times else None,
        "seconds_per_epoch_median": float(np.median(times)) if times else None,
        "seconds_per_epoch_per_model": float(np.median(times)) / num_models if times else None,
        "fit_seconds": fit_seconds, "resumed": resumed, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
    })
    if method in ("noise_scion", "internal_scion"):
        record["scion_filters_total"] = scion_cb.grafted
    logging.info("%s: test accuracy %s (ensemble %.4f), invalid filters <0.1 %s <0.01 %s of %d, %.2f s/epoch.",
                 label, [round(a, 4) for a in accuracies], record["ensemble_accuracy"], record["invalid_0.1"],
                 record["invalid_0.01"], record["filters_per_model"], record["seconds_per_epoch_median"] or 0)
    if method == "teacher":
        path = _teacher_path(seed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        trainer.models[0].save(path + ".tmp.keras")
        os.replace(path + ".tmp.keras", path)  # a kill mid-save leaves no half-written teacher
        logging.info("%s: teacher saved to %s.", label, path)
    if backup_dir:
        shutil.rmtree(backup_dir, ignore_errors=True)
    keras.backend.clear_session()
    return record


def _config_key():
    c = _config()
    return (f"{c['model']}_e{c['epochs']}_n{c['train_subset']}_b{c['batch_size']}_lr{c['lr']:g}_"
            f"wd{c['weight_decay']:g}_px{c['image_size']}")


def _done_runs(path):
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                done.add((record.get("config_key"), record.get("method"), record.get("seed")))
    return done


def study():
    for method in FLAGS.methods:
        if method not in METHODS:
            raise app.UsageError(f"Unknown method {method!r}; choose among {', '.join(METHODS)}.")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    done = _done_runs(FLAGS.output)
    key = _config_key()
    plan = [(int(seed), method) for seed in FLAGS.seeds for method in FLAGS.methods]
    todo = [(seed, method) for seed, method in plan if (key, method, seed) not in done]
    logging.info("Study %s: %d runs planned, %d already in %s, %d to run.", key, len(plan), len(plan) - len(todo),
                 FLAGS.output, len(todo))
    study_start = time.perf_counter()
    model_epochs_done, model_epochs_total = 0, sum(_method_spec(m)[0] for _, m in todo) * FLAGS.epochs
    data_by_seed = {}
    for index, (seed, method) in enumerate(todo, 1):
        if seed not in data_by_seed:
            data_by_seed = {seed: _Data(seed)}
        if method in DISTILLED and not os.path.exists(_teacher_path(seed)):
            logging.info("[%d/%d] %s seed %d needs its teacher, missing from %s: training it first.", index,
                         len(todo), method, seed, FLAGS.teacher_dir)
            teacher_record = _run("teacher", seed, data_by_seed[seed], index, len(todo))
            if (key, "teacher", seed) not in done:
                with open(FLAGS.output, "a") as f:
                    f.write(json.dumps(teacher_record) + "\n")
                done.add((key, "teacher", seed))
        if method == "teacher" and (key, "teacher", seed) in done:
            continue  # trained above for an earlier method of this seed
        record = _run(method, seed, data_by_seed[seed], index, len(todo))
        with open(FLAGS.output, "a") as f:
            f.write(json.dumps(record) + "\n")
        done.add((key, method, seed))
        model_epochs_done += record["num_models"] * FLAGS.epochs
        elapsed = time.perf_counter() - study_start
        remaining = elapsed / model_epochs_done * (model_epochs_total - model_epochs_done)
        logging.info("Progress: %d/%d runs, %.1f min elapsed, about %.1f min left.", index, len(todo),
                     elapsed / 60, remaining / 60)
    logging.info("Study done: %s.", FLAGS.output)


# Report.

def _load_records(path):
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else float("nan"))


def _fmt(mean, std, scale=100.0, digits=2):
    if mean is None:
        return "-"
    if std is None or math.isnan(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summarize(records):
    """Rows per method (in METHODS order) for the latest config in the records."""
    keys = [r["config_key"] for r in records]
    key = max(set(keys), key=keys.count) if keys else None
    records = [r for r in records if r["config_key"] == key]
    rows = []
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        runs.sort(key=lambda r: r["seed"])
        run_means = [r["mean_accuracy"] for r in runs]
        base = {r["seed"]: r["mean_accuracy"] for r in records if r["method"] == "baseline"}
        paired = [r["mean_accuracy"] - base[r["seed"]] for r in runs if r["seed"] in base]
        rows.append({
            "method": method, "models": runs[0]["num_models"], "seeds": [r["seed"] for r in runs],
            "acc": _mean_std(run_means), "paired": _mean_std(paired) if method != "baseline" else None,
            "per_seed": [round(100 * a, 2) for a in run_means],
            "ensemble": _mean_std([r["ensemble_accuracy"] for r in runs]) if runs[0]["num_models"] > 1 else None,
            "invalid_0.1": float(np.mean([v for r in runs for v in r["invalid_0.1"]])),
            "invalid_0.01": float(np.mean([v for r in runs for v in r["invalid_0.01"]])),
            "filters": runs[0]["filters_per_model"],
            "s_epoch": float(np.mean([r["seconds_per_epoch_median"] for r in runs])),
            "s_epoch_model": float(np.mean([r["seconds_per_epoch_per_model"] for r in runs])),
            "description": _method_spec(method)[2],
        })
    return key, rows


# Each distillation method against the same method without distillation (same models, data order and schedule).
_COUNTERPARTS = (("teacher", "baseline"), ("kd", "baseline"), ("cultivate", "graft2"), ("mutual", "ensemble2"))


def _distillation_lines(records, key):
    by = {(r["method"], r["seed"]): r for r in records if r["config_key"] == key}
    lines = []
    for method, other in _COUNTERPARTS:
        seeds = sorted(s for m, s in by if m == method and (other, s) in by)
        if not seeds:
            continue
        diffs = [by[(method, s)]["mean_accuracy"] - by[(other, s)]["mean_accuracy"] for s in seeds]
        per_seed = ", ".join(f"{100 * d:+.2f}" for d in diffs)
        text = f"- {method} vs {other}: {_fmt(*_mean_std(diffs))} points over seeds {seeds} ({per_seed})"
        if method == "mutual":
            ens = [by[(method, s)]["ensemble_accuracy"] - by[(other, s)]["ensemble_accuracy"] for s in seeds]
            text += f"; ensemble {_fmt(*_mean_std(ens))} points"
        teacher = [by[(method, s)]["teacher_accuracy"] for s in seeds if "teacher_accuracy" in by[(method, s)]]
        if teacher:
            text += f"; its teachers' test accuracy {_fmt(*_mean_std(teacher))} %"
        lines.append(text)
    if lines:
        lines = ["", "Distillation, paired by seed against the same method without it (test accuracy per model, "
                 "points):", ""] + lines
    return lines


def report():
    records = _load_records(FLAGS.output)
    if not records:
        raise app.UsageError(f"No results in {FLAGS.output}.")
    key, rows = summarize(records)
    lines = [f"Config `{key}` ({len([r for r in records if r['config_key'] == key])} runs). Test top-1 accuracy "
             "in %: per model = the mean of the run's models (one number per seed), then mean ± sample std over "
             "seeds; ensemble (mean probabilities), likewise; paired = the run's per-model accuracy minus the "
             "baseline's of the same seed (same initialisation and data order of model 0), mean ± std over seeds. "
             "Invalid: filters per model with L1 norm below the threshold, mean over models and seeds.", "",
             "| method | models | seeds | test acc. per model (%) | per seed | ensemble (%) | paired vs baseline "
             "(points) | invalid <0.1 | invalid <0.01 | s/epoch (all models) | s/epoch per model |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ensemble = _fmt(*row["ensemble"]) if row["ensemble"] else "-"
        paired = _fmt(*row["paired"], digits=2) if row["paired"] else "-"
        lines.append(f"| {row['method']} ({row['description']}) | {row['models']} | {len(row['seeds'])} | "
                     f"{_fmt(*row['acc'])} | {', '.join(map(str, row['per_seed']))} | {ensemble} | {paired} | "
                     f"{row['invalid_0.1']:.1f} / {row['filters']} | "
                     f"{row['invalid_0.01']:.1f} / {row['filters']} | {row['s_epoch']:.2f} | "
                     f"{row['s_epoch_model']:.2f} |")
    base = next((r for r in rows if r["method"] == "baseline"), None)
    if base and base["acc"][0] is not None:
        lines.append("")
        lines.append(f"Baseline: {_fmt(*base['acc'])} %. Difference of each method's mean from the baseline "
                     "mean, in baseline standard deviations (over seeds):")
        lines.append("")
        for row in rows:
            if row is base:
                continue
            diff = row["acc"][0] - base["acc"][0]
            sigma = diff / base["acc"][1] if base["acc"][1] and not math.isnan(base["acc"][1]) else float("nan")
            ens = ""
            if row["ensemble"]:
                ens = f"; ensemble {100 * (row['ensemble'][0] - base['acc'][0]):+.2f} points"
            paired = ""
            if row["paired"] and row["paired"][0] is not None:
                paired = f"; paired by seed {_fmt(*row['paired'])} points"
            lines.append(f"- {row['method']}: {100 * diff:+.2f} points ({sigma:+.2f} baseline std){paired}{ens}")
    lines += _distillation_lines(records, key)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.report_md)), exist_ok=True)
    with open(FLAGS.report_md, "w") as f:
        f.write(text)
    print(text)
    _plot(rows, key)
    logging.info("Wrote %s and %s.", FLAGS.report_md, FLAGS.report_png)


def _plot(rows, key):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax_acc, ax_inv) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    means = [100 * r["acc"][0] for r in rows]
    stds = [0 if math.isnan(r["acc"][1]) else 100 * r["acc"][1] for r in rows]
    ax_acc.bar(x - 0.2, means, 0.4, yerr=stds, capsize=3, label="per model", color="tab:blue")
    for i, r in enumerate(rows):  # each seed's per-model accuracy
        ax_acc.plot([x[i] - 0.2] * len(r["per_seed"]), r["per_seed"], "k.", markersize=4)
    ens = [100 * r["ensemble"][0] if r["ensemble"] else np.nan for r in rows]
    ens_std = [100 * r["ensemble"][1] if r["ensemble"] and not math.isnan(r["ensemble"][1]) else 0 for r in rows]
    ax_acc.bar(x + 0.2, ens, 0.4, yerr=ens_std, capsize=3, label="ensemble (N > 1)", color="tab:orange")
    base = next((r for r in rows if r["method"] == "baseline"), None)
    if base:
        mean, std = 100 * base["acc"][0], 0 if math.isnan(base["acc"][1]) else 100 * base["acc"][1]
        ax_acc.axhspan(mean - std, mean + std, color="grey", alpha=0.2, label="baseline mean ± std")
    low = min(min(m - s, min(r["per_seed"])) for m, s, r in zip(means, stds, rows))
    ax_acc.set_ylim(max(0, low - 1.5), min(100, max(np.nanmax(ens) if np.isfinite(ens).any() else 0,
                                                    max(means)) + 1.5))
    ax_acc.set_xticks(x, names, rotation=30, ha="right")
    ax_acc.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax_acc.set_title(f"Accuracy, mean ± std ({key})", fontsize=9)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_inv.bar(x - 0.2, [r["invalid_0.1"] for r in rows], 0.4, label="L1 < 0.1")
    ax_inv.bar(x + 0.2, [r["invalid_0.01"] for r in rows], 0.4, label="L1 < 0.01")
    ax_inv.set_ylim(0, max(1.0, 1.15 * max(max(r["invalid_0.1"], r["invalid_0.01"]) for r in rows)))
    ax_inv.set_xticks(x, names, rotation=30, ha="right")
    ax_inv.set_ylabel(f"invalid filters per model (of {rows[0]['filters']})")
    ax_inv.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.report_png)), exist_ok=True)
    fig.savefig(FLAGS.report_png, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.report:
        report()
        return
    if FLAGS.smoke:
        _apply_smoke()
    study()


if __name__ == "__main__":
    app.run(main)
