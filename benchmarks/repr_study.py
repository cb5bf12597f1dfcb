"""RePr in its own regime: the paper's 3-layer vanilla ConvNet on Fashion-MNIST, baseline vs RePr, paired by seed.

    nice python benchmarks/repr_study.py                       # the study: baseline and repr x seeds 0, 1, 2
    python benchmarks/repr_study.py --smoke                    # every code path on 512 images (seconds)
    python benchmarks/repr_study.py --report                   # paired table from the JSON lines

Protocol (the paper's ConvNet, the public re-implementation's learning rate; see keras_graft/models/convnet.py):
``convnet3`` (three 3x3 convolutions of 32 filters, ReLU, 2x2 max-pool after each, one Dense classifier; no
normalisation, no skip connections, PyTorch's default initialisation) on native 28x28x1 Fashion-MNIST, the first
10,000 training images (small, so that the network overfits as the paper's ConvNet does on CIFAR-10: RePr is a
regulariser), SGD at a constant lr 0.01 (or divided by 10 after ``--milestones``) with momentum 0.9 (the re-implementation uses none over ~40,000 steps;
this budget has 3,476, and momentum makes each step ~10x larger), no weight decay, batch 128, no augmentation (the
re-implementation siahuat0727/RePr found RePr ahead of the baseline: 69.05 vs 64.86 on CIFAR-10; with random crops
and flips it found RePr behind), each model its own data order per seed and epoch. RePr: S1, S2, N cycles and p
scaled from the re-implementation's 20 / 10 / 3 / 0.3 over 110 epochs (three cycles, then S1 epochs of normal
training after the last re-initialisation). Both methods train the same number of epochs in the same
GraftTrainer loop (``steps_per_execution`` steps per compiled call; RePr holds dropped filters inside the step).

Settings are chosen on a validation split carved from the training images (train[55000:], 5000 images), never on
the test set; models train on the first ``--train_subset`` of train[:55000]. Each run appends a JSON line to
``--output``: per-epoch training and validation accuracy, final and best validation accuracy, RePr's events,
seconds per epoch; ``--test`` also records the final test accuracy (for the final study, once settings are fixed).
Resumable: runs already in ``--output`` with the same settings are skipped, and a killed run continues from its
backup (GraftTrainer ``backup_dir``; RePr's state is in the checkpoint).
"""

import hashlib
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

import keras_graft
from keras_graft import criteria
from keras_graft import datasets
from keras_graft import experiment
from keras_graft import models
from keras_graft.trainer import GraftTrainer

_HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("baseline", "repr")

flags.DEFINE_list("methods", list(METHODS), "baseline and/or repr.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initialisation, data order, RePr's re-initialisations).")
flags.DEFINE_string("model", "convnet3", "A keras_graft.models name.")
flags.DEFINE_integer("train_subset", 10_000, "First N images of train[:55000] (at most 55000).")
flags.DEFINE_integer("batch_size", 128, "Batch.")
flags.DEFINE_float("lr", 0.01, "Constant learning rate (the re-implementation's 0.01).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum (the re-implementation: none; see the module docstring).")
flags.DEFINE_float("weight_decay", 0.0, "Coupled weight decay (the re-implementation: none).")
flags.DEFINE_bool("augment", False, "Random crop (4 pixels of padding) and horizontal flip.")
flags.DEFINE_integer("epochs", 44, "Epochs of both methods.")
flags.DEFINE_list("milestones", [], "Epochs after which the lr is divided by 10 (both methods); none: constant lr.")
flags.DEFINE_integer("repr_s1", 8, "RePr: epochs of full training before each drop.")
flags.DEFINE_integer("repr_s2", 4, "RePr: epochs with the dropped filters held at zero.")
flags.DEFINE_integer("repr_cycles", 3, "RePr: cycles.")
flags.DEFINE_float("repr_prune_ratio", 0.3, "RePr: share of the ranked filters dropped per cycle.")
flags.DEFINE_enum("repr_ranking", "global", ["global", "layer"], "RePr: ranking.")
flags.DEFINE_integer("steps_per_execution", 50, "GraftTrainer steps per compiled call.")
flags.DEFINE_bool("test", False, "Also record the final test accuracy (only once the settings are fixed).")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "repr_study.jsonl"), "JSON lines, appended.")
flags.DEFINE_string("backup_root", "/tmp/keras_graft_repr_study_backup", "Per-run checkpoints; '' disables.")
flags.DEFINE_bool("smoke", False, "Every code path on 512 images, 3 epochs, S1 = S2 = 1, one cycle; temporary output.")
flags.DEFINE_bool("report", False, "Print the paired table from --output instead of training.")
FLAGS = flags.FLAGS

VALIDATION_SPLIT = "train[55000:]"


def _schedule():
    if not FLAGS.milestones:
        return "constant"
    return {"name": "step", "milestones": [int(m) for m in FLAGS.milestones]}


def _config():
    config = {"dataset": "fashion_mnist_local", "model": FLAGS.model, "train_subset": FLAGS.train_subset,
              "batch_size": FLAGS.batch_size, "lr": FLAGS.lr, "momentum": FLAGS.momentum,
              "weight_decay": FLAGS.weight_decay, "augment": FLAGS.augment, "epochs": FLAGS.epochs,
              "schedule": _schedule(), "validation": VALIDATION_SPLIT,
              "repr": {"s1": FLAGS.repr_s1, "s2": FLAGS.repr_s2, "cycles": FLAGS.repr_cycles,
                       "prune_ratio": FLAGS.repr_prune_ratio, "ranking": FLAGS.repr_ranking}}
    config["key"] = json.dumps({k: v for k, v in config.items() if k != "key"}, sort_keys=True)
    return config


class _Curves(keras.callbacks.Callback):
    def __init__(self, label):
        super().__init__()
        self.label = label
        self.rows = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self._start[0], 2),
               "cpu_seconds": round(time.process_time() - self._start[1], 2),
               "train_accuracy": round(float(logs.get("accuracy", math.nan)), 4),
               "val_accuracy": round(float(logs.get("val_accuracy", math.nan)), 4)}
        if "repr_phase" in logs:
            row.update(repr_phase=int(logs["repr_phase"]), repr_dropped=int(logs["repr_dropped"]))
        self.rows.append(row)
        logging.info("%s %s", self.label, row)


def _run(method, seed, config):
    base = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size,
                                         split="train[:55000]", base_seed=1_000_003 * seed,
                                         subset=FLAGS.train_subset, augment=FLAGS.augment)
    validation = datasets.load("fashion_mnist_local", VALIDATION_SPLIT, training=False, batch_size=1000)
    steps = math.ceil(FLAGS.train_subset / FLAGS.batch_size)
    backup_dir = None
    if FLAGS.backup_root:
        digest = hashlib.sha1(config["key"].encode()).hexdigest()[:10]
        backup_dir = os.path.join(FLAGS.backup_root, f"{method}_seed{seed}_{digest}")
    trainer = GraftTrainer(
        lambda: models.get(FLAGS.model, num_classes=10, input_shape=(28, 28, 1), weight_decay=FLAGS.weight_decay),
        num_models=1, optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=FLAGS.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], seed=seed,
        backup_dir=backup_dir, steps_per_execution=FLAGS.steps_per_execution,
        **({"lr_schedule": _schedule()} if FLAGS.milestones else {}))
    label = f"{method} seed {seed}"
    curves = _Curves(label)
    callbacks = []
    repr_callback = None
    if method == "repr":
        repr_callback = keras_graft.RePr(s1=FLAGS.repr_s1, s2=FLAGS.repr_s2, cycles=FLAGS.repr_cycles,
                                         prune_ratio=FLAGS.repr_prune_ratio, ranking=FLAGS.repr_ranking, seed=seed)
        callbacks.append(repr_callback)
    callbacks.append(curves)
    start = time.perf_counter()
    trainer.fit(lambda k, context, epoch=0: base(k, context, epoch=epoch), epochs=FLAGS.epochs, steps_per_epoch=steps,
                validation_data=validation, callbacks=callbacks, verbose=0)
    record = {"method": method, "seed": seed, "config": config, "curves": curves.rows,
              "final_val_accuracy": curves.rows[-1]["val_accuracy"] if curves.rows else None,
              "best_val_accuracy": max((r["val_accuracy"] for r in curves.rows), default=None),
              "seconds_per_epoch_median": float(np.median([r["seconds"] for r in curves.rows])) if curves.rows
              else None,
              "cpu_seconds_per_epoch_median": float(np.median([r["cpu_seconds"] for r in curves.rows])) if curves.rows
              else None, "fit_seconds": round(time.perf_counter() - start, 1),
              "resumed": len(curves.rows) < FLAGS.epochs, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # RePr's mechanism: the mean overlap of each convolution's filters (its own criterion, lower = more orthogonal).
    convolutions = [layer for layer in trainer.models[0].layers if isinstance(layer, keras.layers.Conv2D)]
    record["final_overlap"] = [round(float(criteria.Orthogonality()(layer.kernel, per_filter=False)), 5)
                               for layer in convolutions]
    if repr_callback is not None:
        record["repr_events"] = [{k: e[k] for k in ("event", "cycle", "unit", "dropped", "levels") if k in e}
                                 for e in repr_callback.history]
    if FLAGS.test:
        test = datasets.load("fashion_mnist_local", "test", training=False, batch_size=1000)
        record["test_accuracy"] = trainer.evaluate(test)["accuracy_0"]
    if backup_dir:
        shutil.rmtree(backup_dir, ignore_errors=True)
    keras.backend.clear_session()
    logging.info("%s: final validation accuracy %.4f (best %.4f), %.1f s per epoch", label,
                 record["final_val_accuracy"], record["best_val_accuracy"], record["seconds_per_epoch_median"] or 0)
    return record


def report():
    records = experiment.read_jsonl(FLAGS.output)
    key = _config()["key"]
    by = {(r["method"], r["seed"]): r for r in records if r["config"]["key"] == key}
    seeds = sorted({s for m, s in by if m == "baseline" and ("repr", s) in by})
    if not seeds:
        print(f"No paired runs for this configuration in {FLAGS.output}.")
        return
    lines = ["| seed | baseline final | RePr final | diff | baseline last 4 | RePr last 4 | diff | baseline best | "
             "RePr best |", "|---|---|---|---|---|---|---|---|---|"]
    diffs, diffs4 = [], []

    def last4(record):
        return float(np.mean([row["val_accuracy"] for row in record["curves"][-4:]]))

    for s in seeds:
        b, r = by[("baseline", s)], by[("repr", s)]
        diffs.append(r["final_val_accuracy"] - b["final_val_accuracy"])
        diffs4.append(last4(r) - last4(b))
        lines.append(f"| {s} | {100 * b['final_val_accuracy']:.2f} | {100 * r['final_val_accuracy']:.2f} | "
                     f"{100 * diffs[-1]:+.2f} | {100 * last4(b):.2f} | {100 * last4(r):.2f} | {100 * diffs4[-1]:+.2f} | "
                     f"{100 * b['best_val_accuracy']:.2f} | {100 * r['best_val_accuracy']:.2f} |")
    overlaps = [(np.mean(by[("baseline", s)]["final_overlap"]), np.mean(by[("repr", s)]["final_overlap"]))
                for s in seeds if "final_overlap" in by[("baseline", s)] and "final_overlap" in by[("repr", s)]]
    if overlaps:
        lines.append("\nFinal filter overlap (RePr's criterion, mean over the convolutions; lower = more orthogonal): "
                     "baseline " + ", ".join(f"{b:.4f}" for b, _ in overlaps) + "; RePr " +
                     ", ".join(f"{r:.4f}" for _, r in overlaps) + ".")
    for name, values in (("final", diffs), ("mean of the last 4 epochs", diffs4)):
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        lines.append(f"\nPaired difference (RePr - baseline, {name}, validation accuracy): "
                     f"{100 * np.mean(values):+.2f} ± {100 * std:.2f} points over seeds {seeds}.")
    print("\n".join(lines))


def main(argv):
    del argv
    if FLAGS.report:
        report()
        return
    if FLAGS.smoke:
        FLAGS.seeds, FLAGS.train_subset, FLAGS.epochs = ["0"], 512, 3
        FLAGS.repr_s1, FLAGS.repr_s2, FLAGS.repr_cycles, FLAGS.steps_per_execution = 1, 1, 1, 2
        if not FLAGS["output"].present:
            FLAGS.output = "/tmp/keras_graft_repr_study_smoke.jsonl"
            if os.path.exists(FLAGS.output):
                os.remove(FLAGS.output)
        if not FLAGS["backup_root"].present:
            FLAGS.backup_root = ""
    if not 0 < FLAGS.train_subset <= 55_000:
        raise app.UsageError("--train_subset must lie in [1, 55000]: the last 5000 training images validate.")
    config = _config()
    done = {(r["method"], r["seed"]) for r in experiment.read_jsonl(FLAGS.output) if r["config"]["key"] == config["key"]}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    for seed in map(int, FLAGS.seeds):
        for method in FLAGS.methods:
            if method not in METHODS:
                raise app.UsageError(f"Unknown method {method!r}.")
            if (method, seed) in done:
                continue
            record = _run(method, seed, config)
            experiment.append_jsonl(FLAGS.output, record)
    report()


if __name__ == "__main__":
    app.run(main)
