"""Milliseconds per GraftTrainer step for the accuracy study's network, as one JSON line.

    python benchmarks/step_time.py --num_models=2 --steps_per_execution=50
    PYTHONPATH=/path/to/other/checkout python benchmarks/step_time.py --label=other   # compare two code trees

Used to choose the study's batch and ``steps_per_execution`` (same numerics as 1, fewer Python round trips) and to
check that a refactor of the training step costs nothing: run the commands alternately, under the same load, and
compare the ratios. The final loss is printed too; two code trees with the same numerics print the same value.
``first_epoch_s`` is the warm-up epoch of 100 steps, which also traces and compiles the step.
"""

import json
import time

from absl import app
from absl import flags

import keras

import keras_graft
from keras_graft import datasets
from keras_graft import models
from keras_graft.trainer import GraftTrainer

flags.DEFINE_string("label", "this", "Name of this code tree in the output.")
flags.DEFINE_integer("num_models", 2, "Peers (grafting with the lr spread when 2 or more).")
flags.DEFINE_integer("width", 8, "ResNet-8 width.")
flags.DEFINE_integer("batch_size", 32, "Batch per model.")
flags.DEFINE_integer("steps_per_execution", 50, "Steps per compiled call.")
flags.DEFINE_integer("steps", 300, "Timed steps (after 100 steps of warm-up).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    data = datasets.per_model_dataset_fn("fashion_mnist_local", batch_size=FLAGS.batch_size, base_seed=0,
                                         subset=12800)
    grafting = FLAGS.num_models > 1
    trainer = GraftTrainer(
        lambda: models.cifar_resnet(8, width=FLAGS.width, num_classes=10, input_shape=(28, 28, 1), weight_decay=5e-4),
        FLAGS.num_models, optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], seed=0,
        steps_per_execution=FLAGS.steps_per_execution, grafting=keras_graft.Grafting() if grafting else None,
        lr_spread=grafting)
    start = time.perf_counter()
    trainer.fit(data, epochs=1, steps_per_epoch=100, verbose=0)
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    history = trainer.fit(data, epochs=2, initial_epoch=1, steps_per_epoch=FLAGS.steps, verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"label": FLAGS.label, "num_models": FLAGS.num_models, "batch_size": FLAGS.batch_size,
                      "steps_per_execution": FLAGS.steps_per_execution, "ms_per_step": 1000 * seconds / FLAGS.steps,
                      "first_epoch_s": warm_up,
                      "final_loss": history.history["loss"][-1]}))


if __name__ == "__main__":
    app.run(main)
