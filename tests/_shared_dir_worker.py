"""One rank of a SharedDirectory grafting test: trains a tiny model with model.fit and grafts through a directory.

Run by tests/test_shared_directory.py as a separate process. After every epoch (and its graft) it saves the
model's weights to ``{out}/rank{rank}-epoch{epoch}.npz``. The model and data come from _shared_dir_model, which the
test uses to repeat the same training in-process.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

import _shared_dir_model as tiny
import keras_graft
from keras_graft.shared_directory import SharedDirectory

flags.DEFINE_string("dir", None, "Shared directory.", required=True)
flags.DEFINE_string("out", None, "Where to save the weights after every epoch.", required=True)
flags.DEFINE_integer("rank", None, "Rank of this process.", required=True)
flags.DEFINE_integer("world_size", 2, "Number of processes.")
flags.DEFINE_integer("epochs", 3, "Epochs to train.")
flags.DEFINE_float("timeout", 60.0, "SharedDirectory timeout in seconds.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored"], "mirrored: two replicas on two logical CPUs.")
flags.DEFINE_integer("exit_after_epoch", -1, "Exit abruptly after this (0-based) epoch and its graft.")
flags.DEFINE_integer("crash_in_epoch", -1, "Exit abruptly in the middle of this epoch, once (see crash_marker).")
flags.DEFINE_string("crash_marker", None, "Created when crashing; no crash when it exists.")
flags.DEFINE_string("backup_dir", None, "Use keras.callbacks.BackupAndRestore with this directory.")

FLAGS = flags.FLAGS

def main(argv):
    del argv
    if FLAGS.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.get_strategy()

    class SaveAndExit(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == FLAGS.crash_in_epoch and batch == 1 and not os.path.exists(FLAGS.crash_marker):
                open(FLAGS.crash_marker, "w").close()
                os._exit(3)

        def on_epoch_end(self, epoch, logs=None):
            np.savez(os.path.join(FLAGS.out, f"rank{FLAGS.rank}-epoch{epoch}.npz"), *self.model.get_weights())
            if epoch == FLAGS.exit_after_epoch:
                os._exit(4)

    with strategy.scope():
        model = tiny.build_model(FLAGS.rank)
    peers = SharedDirectory(FLAGS.dir, FLAGS.rank, FLAGS.world_size, timeout=FLAGS.timeout)
    callbacks = [keras_graft.Grafting(peers=peers)]
    if FLAGS.backup_dir:
        callbacks.append(keras.callbacks.BackupAndRestore(FLAGS.backup_dir))
    callbacks.append(SaveAndExit())
    x, y = tiny.training_data(FLAGS.rank)
    model.fit(x, y, epochs=FLAGS.epochs, callbacks=callbacks, **tiny.FIT_KWARGS)


if __name__ == "__main__":
    app.run(main)
