"""Why did RePr lose 8.65 points in the accuracy study? Per-epoch curves of the study's RePr run and its variants.

    nice python benchmarks/repr_diagnosis.py --variants=baseline,repr        # the study's config, seed 0

The study's configuration (benchmarks/accuracy.py): ResNet-8 width 8 on the first 8192 Fashion-MNIST training
images (28x28x1), 12 epochs, batch 128, SGD lr 0.1 momentum 0.9, coupled weight decay 5e-4, cosine annealing per
step, RePr S1 = 2, S2 = 1 epochs, 3 cycles, p = 0.3. Accuracy is measured on a validation split carved from the
training images (the last 5000, disjoint from the 8192), never on the test set. Each variant appends one JSON line
with, per epoch: learning rate, training accuracy (running, training mode), validation accuracy; at the end the
validation accuracy after re-estimating every BatchNormalization's moving statistics on training batches (if BN
statistics were the problem, this would recover the gap).

Variants:
  baseline         no RePr;
  repr             RePr as the study ran it;
  repr_<s1>_<s2>_<cycles>   other schedules, e.g. repr_2_1_2 (last re-initialisation after epoch 6);
  repr_layer, repr_chance   other rankings: p of every layer; global on scores divided by chance overlap;
                   combine with a schedule: repr_layer_2_1_2;
  repr_zero_next   as repr, plus the weights of the next convolution that read a re-initialised channel set to 0
                   (the re-implementation siahuat0727/RePr does this), so that new filters enter smoothly.
"""

import json
import time

from absl import app
from absl import flags
from absl import logging

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import datasets
from keras_graft import groups as groups_lib
from keras_graft import models
from keras_graft.trainer import GraftTrainer

flags.DEFINE_list("variants", ["baseline", "repr"], "Variants to run (see the module docstring).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("model", "resnet8_w8", "resnet<depth>_w<width> or convnet3 (keras_graft.models).")
flags.DEFINE_integer("epochs", 12, "Epochs.")
flags.DEFINE_integer("train_subset", 8192, "First N training images.")
flags.DEFINE_integer("batch_size", 128, "Batch.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled weight decay.")
flags.DEFINE_string("schedule", "cosine", "cosine or constant.")
flags.DEFINE_float("prune_ratio", 0.3, "RePr p.")
flags.DEFINE_integer("steps_per_execution", 1, "GraftTrainer steps per compiled call.")
flags.DEFINE_string("output", "/tmp/repr_diagnosis.jsonl", "JSON lines, appended.")
FLAGS = flags.FLAGS


def build_model():
    if FLAGS.model.startswith("resnet"):
        depth, width = FLAGS.model[len("resnet"):].split("_w")
        return models.cifar_resnet(int(depth), width=int(width), num_classes=10, input_shape=(28, 28, 1),
                                   weight_decay=FLAGS.weight_decay)
    return models.get(FLAGS.model, num_classes=10, input_shape=(28, 28, 1), weight_decay=FLAGS.weight_decay)


class ZeroNextRePr(keras_graft.RePr):
    """RePr that also zeroes the next layer's input weights of the re-initialised channels (where one layer reads
    them directly, found through graft_structure's filter-level input links)."""

    def _reinitialise(self, state, cycle, unit):
        dropped = state.variables.dropped()
        super()._reinitialise(state, cycle, unit)
        structure = groups_lib.graft_structure(state.model)
        weights = state.model.weights
        names = [g.name for g in structure.groups]
        for weight_index, (group_index, axis) in structure.input_links.items():
            for i, plan in enumerate(state.plans):
                if i in dropped and names[group_index] == plan.name:
                    var = weights[weight_index]
                    value = var.numpy()
                    moved = np.moveaxis(value, axis, 0)
                    moved[dropped[i]] = 0.0
                    var.assign(np.moveaxis(moved, 0, axis))


def chance_overlap(d):
    """E|cos| between two independent uniformly random directions in R^d: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    from math import lgamma, exp, pi, sqrt
    return exp(lgamma(d / 2) - lgamma((d + 1) / 2)) / sqrt(pi)


class RankedRePr(keras_graft.RePr):
    """RePr with another ranking: "layer" (p of every layer) or "chance" (global, scores divided by the score of
    random filters of the layer's shape)."""

    ranking = "global"

    def _drop(self, state, cycle, unit):
        from keras_graft import reactivation
        original = reactivation.select_filters
        plans = state.plans

        def select(scores, ratio, higher_is_better=False):
            if self.ranking == "layer":
                return [original([s], ratio, higher_is_better)[0] for s in scores]
            scaled = []
            for s, plan in zip(scores, plans):
                d = int(np.prod(plan.kernel.shape)) // plan.num_filters
                scaled.append(np.asarray(s) / ((plan.num_filters - 1) / plan.num_filters * chance_overlap(d)))
            return original(scaled, ratio, higher_is_better)

        reactivation.select_filters = select
        try:
            super()._drop(state, cycle, unit)
        finally:
            reactivation.select_filters = original


class Curves(keras.callbacks.Callback):
    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.rows = []
        self.start = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self.start, 2),
               "lr": logs.get("learning_rate_0"), "train_accuracy": round(logs.get("accuracy", float("nan")), 4),
               "val_accuracy": round(logs.get("val_accuracy", float("nan")), 4)}
        for key in ("repr_phase", "repr_dropped"):
            if key in logs:
                row[key] = logs[key]
        self.rows.append(row)
        logging.info("%s", row)


def bn_recalibrated_accuracy(model, train_fn, val, batches=40):
    """Validation accuracy after replacing every BN's moving statistics by their mean over training batches."""
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return None
    saved = [(bn.moving_mean.numpy(), bn.moving_variance.numpy()) for bn in bns]
    probes = keras.Model(model.inputs, [bn.input for bn in bns])
    sums = [[0.0, 0.0] for _ in bns]
    data = train_fn(0, tf.distribute.InputContext(), 999)
    count = 0
    for x, _ in data.take(batches):
        for k, out in enumerate(probes(x, training=False)):
            out = out.numpy()
            axes = tuple(range(out.ndim - 1))
            sums[k][0] += out.mean(axis=axes)
            sums[k][1] += out.var(axis=axes)
        count += 1
    for bn, (m, v) in zip(bns, sums):
        bn.moving_mean.assign(m / count)
        bn.moving_variance.assign(v / count)
    correct = total = 0
    for x, y in val:
        pred = np.argmax(model(x, training=False).numpy(), axis=-1)
        correct += int(np.sum(pred == np.asarray(y).reshape(-1)))
        total += len(pred)
    for bn, (m, v) in zip(bns, saved):
        bn.moving_mean.assign(m)
        bn.moving_variance.assign(v)
    return correct / total


def run(variant):
    seed = FLAGS.seed
    base = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size,
                                         base_seed=1_000_003 * seed, subset=FLAGS.train_subset)

    def train_fn(k, context, epoch=0):
        return base(int(k) + 64 * int(epoch), context)

    val = datasets.load("fashion_mnist_local", "train[55000:]", training=False, batch_size=1000)
    steps = -(-FLAGS.train_subset // FLAGS.batch_size)
    trainer = GraftTrainer(build_model, num_models=1,
                           optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=FLAGS.momentum),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                           lr_schedule=None if FLAGS.schedule == "constant" else FLAGS.schedule, seed=seed,
                           steps_per_execution=FLAGS.steps_per_execution)
    curves = Curves(trainer)
    callbacks = []
    info = {}
    if variant != "baseline":
        parts = variant.split("_")
        s1, s2, cycles = 2, 1, 3
        cls = keras_graft.RePr
        if "zero_next" in variant:
            cls = ZeroNextRePr
        elif "layer" in parts or "chance" in parts:
            cls = type("R", (RankedRePr,), {"ranking": "layer" if "layer" in parts else "chance"})
        digits = [int(p) for p in parts if p.isdigit()]
        if len(digits) == 3:
            s1, s2, cycles = digits
        repr_cb = cls(s1=s1, s2=s2, prune_ratio=FLAGS.prune_ratio, cycles=cycles, seed=seed)
        callbacks.append(repr_cb)
        info = {"s1": s1, "s2": s2, "cycles": cycles, "prune_ratio": FLAGS.prune_ratio,
                "class": getattr(cls, "ranking", cls.__name__)}
    callbacks.append(curves)
    start = time.perf_counter()
    trainer.fit(train_fn, epochs=FLAGS.epochs, steps_per_epoch=steps, validation_data=val, callbacks=callbacks,
                verbose=0)
    record = {"variant": variant, "seed": seed, "model": FLAGS.model, "epochs": FLAGS.epochs,
              "train_subset": FLAGS.train_subset, "batch_size": FLAGS.batch_size, "lr": FLAGS.lr,
              "momentum": FLAGS.momentum, "weight_decay": FLAGS.weight_decay, "schedule": FLAGS.schedule,
              "repr": info, "events": [{k: e[k] for k in ("event", "cycle", "dropped") if k in e}
                                       for e in (repr_cb.history if variant != "baseline" else [])],
              "curves": curves.rows, "final_val_accuracy": curves.rows[-1]["val_accuracy"],
              "val_accuracy_bn_recalibrated": bn_recalibrated_accuracy(trainer.models[0], train_fn, val),
              "fit_seconds": round(time.perf_counter() - start, 1)}
    with open(FLAGS.output, "a") as f:
        f.write(json.dumps(record) + "\n")
    logging.info("%s: final val %.4f, BN recalibrated %s", variant, record["final_val_accuracy"],
                 record["val_accuracy_bn_recalibrated"])
    keras.backend.clear_session()


def main(argv):
    del argv
    for variant in FLAGS.variants:
        run(variant)


if __name__ == "__main__":
    app.run(main)
