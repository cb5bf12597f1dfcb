"""One rank of a SharedDirectory grafting test: trains a tiny model with model.fit and grafts through a directory.

Run by tests/test_shared_directory.py as a separate process. When ``fit`` returns it saves the model's weights to
``{out}/rank{rank}-final.npz`` (with --save_grafts also after every graft, ``rank{rank}-graft{round}.npz``). The
model and data come from _shared_dir_model, which the test uses to repeat the same training in-process.

--kill lists kill points, each ``point:index``, fired once (a marker file in --out remembers it): the process then
dies at once with exit code 3, as a preempted job would, and the test restarts the same command.

- ``mid_epoch:E``: after the second batch of (0-based) epoch E;
- ``after_publish:R``: right after publishing its file of round R;
- ``after_graft:R``: right after grafting round R (when epoch R + 1 begins);
- ``during_write:R``: halfway through writing its file of round R (a partial temporary file is left);
- ``after_fit:0``: after ``fit`` returned, before the weights are saved.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

import _shared_dir_model as tiny
import keras_graft
from keras_graft import shared_directory

flags.DEFINE_string("dir", None, "Shared directory.", required=True)
flags.DEFINE_string("out", None, "Where to save the weights.", required=True)
flags.DEFINE_integer("rank", None, "Rank of this process.", required=True)
flags.DEFINE_integer("world_size", 2, "Number of processes.")
flags.DEFINE_integer("epochs", 3, "Epochs to train.")
flags.DEFINE_float("timeout", 60.0, "SharedDirectory timeout in seconds.")
flags.DEFINE_float("lease_interval", 0.2, "SharedDirectory lease_interval in seconds.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored"], "mirrored: two replicas on two logical CPUs.")
flags.DEFINE_integer("exit_after_epoch", -1, "Exit abruptly (code 4) after this (0-based) epoch.")
flags.DEFINE_list("kill", [], "Kill points, see the module docstring.")
flags.DEFINE_bool("save_grafts", False, "Save the weights after every graft.")

FLAGS = flags.FLAGS


def _marker(point):
    return os.path.join(FLAGS.out, f"rank{FLAGS.rank}-killed-{point.replace(':', '-')}")


def armed(point):
    """Whether --kill lists ``point`` and it has not fired yet."""
    return point in FLAGS.kill and not os.path.exists(_marker(point))


def fire(point):
    """Dies (exit code 3) at a kill point listed in --kill, once."""
    if armed(point):
        open(_marker(point), "w").close()
        os._exit(3)


def install_kill_points(peers):
    publish, write = peers.publish, shared_directory.write_atomically

    def publish_then_die(model, round_index):
        path = publish(model, round_index)
        fire(f"after_publish:{round_index}")
        return path

    def write_and_die_halfway(path, data):
        for point in FLAGS.kill:
            if point.startswith("during_write:") and path == peers.filename(int(point.split(":")[1])) and \
                    armed(point):
                directory, name = path.rsplit("/", 1)
                with open(f"{directory}/.{name}.tmp-killed", "wb") as f:
                    f.write(data[: len(data) // 2])
                fire(point)
        return write(path, data)

    peers.publish = publish_then_die
    shared_directory.write_atomically = write_and_die_halfway


def main(argv):
    del argv
    if FLAGS.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.get_strategy()

    class KillPoints(keras.callbacks.Callback):
        """Listed after Grafting: its on_epoch_begin runs after the round that opens the epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if epoch > 0:
                if FLAGS.save_grafts:
                    np.savez(os.path.join(FLAGS.out, f"rank{FLAGS.rank}-graft{epoch - 1}.npz"),
                             *self.model.get_weights())
                fire(f"after_graft:{epoch - 1}")

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                fire(f"mid_epoch:{self.epoch}")

        def on_epoch_end(self, epoch, logs=None):
            if epoch == FLAGS.exit_after_epoch:
                os._exit(4)

    with strategy.scope():
        model = tiny.build_model(FLAGS.rank)
    peers = shared_directory.SharedDirectory(FLAGS.dir, FLAGS.rank, FLAGS.world_size, timeout=FLAGS.timeout,
                                             lease_interval=FLAGS.lease_interval)
    install_kill_points(peers)
    x, y = tiny.training_data(FLAGS.rank)
    model.fit(x, y, epochs=FLAGS.epochs, callbacks=[keras_graft.Grafting(peers=peers), KillPoints()],
              **tiny.FIT_KWARGS)
    fire("after_fit:0")
    np.savez(os.path.join(FLAGS.out, f"rank{FLAGS.rank}-final.npz"), *model.get_weights())


if __name__ == "__main__":
    app.run(main)
