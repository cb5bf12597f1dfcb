"""A GraftTrainer run in its own process, for the resume and multi-worker tests.

python tests/_trainer_worker.py --out=weights.npz [--strategy=multi_worker] [--backup_dir=DIR] [--exit_after_epoch=2]

Trains 2 tiny peers with grafting on deterministic data and saves every model's weights to --out. With
--exit_after_epoch the process dies (os._exit, no clean-up) right after that epoch, as a preempted job would.
The multi-worker strategy reads the cluster from TF_CONFIG.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_graft import strategies  # noqa: E402
from keras_graft.trainer import GraftTrainer  # noqa: E402

flags.DEFINE_string("out", None, "Where to save the final weights (.npz).", required=True)
flags.DEFINE_enum("strategy", "default", ["default", "multi_worker"], "Distribution strategy.")
flags.DEFINE_string("backup_dir", None, "GraftTrainer backup_dir.")
flags.DEFINE_integer("epochs", 4, "Epochs to train.")
flags.DEFINE_integer("exit_after_epoch", 0, "Kill the process after this (1-based) epoch; 0: never.")
FLAGS = flags.FLAGS


class ExitAfterEpoch(keras.callbacks.Callback):
    """Ends the process abruptly (no clean-up) after the given 1-based epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, index, logs=None):
        if index + 1 == self.epoch:
            os._exit(3)


def main(_):
    strategy = strategies.get(FLAGS.strategy)  # MultiWorkerMirroredStrategy must exist before any other op.
    tf.config.experimental.enable_op_determinism()

    def build():
        return keras.Sequential([
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-3)),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=48)
    trainer = GraftTrainer(build, 2, optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                           grafting={"every_n_epochs": 2, "final_graft": True}, strategy=strategy, lr_spread=True, lr_schedule="cosine",
                           seed=7, backup_dir=FLAGS.backup_dir)
    callbacks = [ExitAfterEpoch(FLAGS.exit_after_epoch)] if FLAGS.exit_after_epoch else []
    history = trainer.fit((x, y), epochs=FLAGS.epochs, batch_size=8, validation_data=(x, y), callbacks=callbacks,
                          verbose=0)
    arrays = {f"m{k}_w{i}": w for k, model in enumerate(trainer.models) for i, w in enumerate(model.get_weights())}
    arrays["epochs_run"] = np.array(history.epoch)
    arrays["iterations"] = np.array([int(opt.iterations.numpy()) for opt in trainer.optimizers])
    np.savez(FLAGS.out, **arrays)


if __name__ == "__main__":
    app.run(main)
