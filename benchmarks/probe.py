"""Probe for the accuracy study: does a network/schedule give invalid filters with >= 20,000 SGD steps at lr 0.1?

    nice python benchmarks/probe.py                      # ResNet-8 width 8, batch 32, baseline and graft2
    python benchmarks/probe.py --smoke                   # every code path on 512 images, 1 epoch

Settings are chosen here, on a validation split carved from the training images (the first 55,000 train, the last
5,000 validate), never on the test set. Each run appends one JSON line to ``--output`` with, per epoch, the
learning rate, the validation accuracy of every model (and of the ensemble), measured before that epoch's graft as
the reference does, and the invalid filters of every model (L1 norm below 0.1 and 0.01, the thresholds of the
papers; the ratio the reference's users report, 3.66% for a ResNet-32 baseline, is the share below 0.1).

Resumable: runs already in ``--output`` with the same settings are skipped.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging

import keras

import keras_graft
from keras_graft import datasets
from keras_graft import experiment
from keras_graft.trainer import GraftTrainer

_HERE = os.path.dirname(os.path.abspath(__file__))
THRESHOLDS = (0.1, 0.01)
TRAIN_EXAMPLES = 55_000

flags.DEFINE_list("models", ["resnet8_w8"], "Networks: resnet<depth>_w<width> (CIFAR ResNet, option-A shortcut).")
flags.DEFINE_list("methods", ["baseline", "graft2"], "baseline (1 model) and/or graft2 (2 models, lr spread, "
                  "step schedule, entropy grafting every epoch: the reference protocol).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation and data order.")
flags.DEFINE_integer("batch_size", 32, "Batch per model.")
flags.DEFINE_integer("epochs", 16, "Epochs per model.")
flags.DEFINE_list("milestones", ["12", "15"], "Epochs at which the learning rate is divided by 10.")
flags.DEFINE_float("lr", 0.1, "Initial learning rate.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay.")
flags.DEFINE_integer("steps_per_execution", 50, "Training steps per compiled call.")
flags.DEFINE_string("output", os.path.join(_HERE, "results", "probe.jsonl"), "JSON lines, appended.")
flags.DEFINE_bool("smoke", False, "Every code path on 512 training images, 1 epoch; writes to a temporary file.")
FLAGS = flags.FLAGS


def build_fn(name):
    """Builds the network a label names (``resnet8_w8``) for Fashion-MNIST's 28x28x1 images."""
    return experiment.ModelSpec.from_label(name, input_shape=(28, 28, 1), weight_decay=FLAGS.weight_decay).build


def settings(model_name, method):
    return {"model": model_name, "method": method, "seed": FLAGS.seed, "batch_size": FLAGS.batch_size,
            "epochs": FLAGS.epochs, "milestones": [int(m) for m in FLAGS.milestones], "lr": FLAGS.lr,
            "weight_decay": FLAGS.weight_decay, "train_examples": FLAGS.smoke and 512 or TRAIN_EXAMPLES}


def run(model_name, method):
    config = settings(model_name, method)
    num_models = 1 if method == "baseline" else 2
    examples = config["train_examples"]
    train = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size,
                                          base_seed=1_000_003 * FLAGS.seed, subset=examples)
    validation = datasets.load("fashion_mnist_local", f"train[{TRAIN_EXAMPLES}:]", batch_size=1000,
                               training=False)
    steps = -(-examples // FLAGS.batch_size)
    trainer = GraftTrainer(
        build_fn(model_name), num_models, optimizer=keras.optimizers.SGD(FLAGS.lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
        grafting=keras_graft.Grafting() if method == "graft2" else None, lr_spread=method == "graft2",
        lr_schedule={"name": "step", "milestones": config["milestones"]}, seed=FLAGS.seed,
        steps_per_execution=FLAGS.steps_per_execution)
    record = experiment.EpochRecord(trainer, f"{model_name} {method}", accuracy_key="val_accuracy",
                                    peer_distance=False)
    start = time.perf_counter()
    trainer.fit(train, epochs=FLAGS.epochs,
                steps_per_epoch=steps, validation_data=validation, callbacks=[record], verbose=0)
    filters = keras_graft.criteria.invalid_filters(trainer.models[0], THRESHOLDS[0]).total
    keras.backend.clear_session()
    return {**config, "steps_per_epoch": steps, "steps_at_initial_lr": steps * config["milestones"][0],
            "filters_per_model": filters, "fit_seconds": time.perf_counter() - start, "per_epoch": record.rows,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.epochs, FLAGS.milestones = 1, ["1"]
        if not FLAGS["output"].present:
            FLAGS.output = "/tmp/keras_graft_probe_smoke.jsonl"
            if os.path.exists(FLAGS.output):
                os.remove(FLAGS.output)
    done = experiment.read_jsonl(FLAGS.output)
    for model_name in FLAGS.models:
        for method in FLAGS.methods:
            config = settings(model_name, method)
            if any(all(r.get(k) == v for k, v in config.items()) for r in done):
                logging.info("%s %s: already in %s.", model_name, method, FLAGS.output)
                continue
            result = run(model_name, method)
            experiment.append_jsonl(FLAGS.output, result)


if __name__ == "__main__":
    app.run(main)
