"""Shared test helpers. Importing this module splits the CPU into two logical devices (before TensorFlow starts),
so that MirroredStrategy runs two replicas whether the tests run under pytest or a file runs on its own
(``python tests/test_scions.py``, through ``tf.test.main()``)."""

import functools
import multiprocessing
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import tensorflow as tf  # noqa: E402


def _split_cpu():
    cpu = tf.config.list_physical_devices("CPU")[0]
    if tf.config.get_logical_device_configuration(cpu) is None:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


if multiprocessing.parent_process() is None:  # a process that processes.py starts chooses its own devices
    _split_cpu()


@functools.lru_cache(maxsize=None)
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole test session.

    Several MirroredStrategy objects in one process draw colliding collective instance keys, so every test that
    needs one shares this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


# Strategies that tests are parameterised over: @parameterized.named_parameters(*testing_utils.STRATEGIES), then
# testing_utils.strategy(name) inside the test. MultiWorkerMirrored runs in its own processes
# (tests/test_trainer_multiworker.py).
STRATEGIES = (("default", "default"), ("one_device", "one_device"), ("mirrored", "mirrored"))


def strategy(name):
    """The strategy a STRATEGIES parameter names."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        return mirrored_strategy()
    raise ValueError(f"Unknown strategy {name!r}; choose among {[n for n, _ in STRATEGIES]}.")


@functools.lru_cache(maxsize=None)
def fashion_mnist_available():
    """Whether the real Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) can be read."""
    from keras_graft import datasets  # pylint: disable=import-outside-toplevel

    try:
        datasets.load("fashion_mnist_local", "test", batch_size=8, subset=8)
        return True
    except datasets.DatasetUnavailableError:
        return False


def interrupt_after(epoch):
    """A Keras callback raising KeyboardInterrupt when (0-based) epoch ``epoch`` ends, after the callbacks before it
    (backups) ran: a killed process, for resume tests."""
    import keras  # pylint: disable=import-outside-toplevel

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch_index, logs=None):
            if epoch_index == epoch:
                raise KeyboardInterrupt(f"interrupted after epoch {epoch}")

    return Interrupt()

