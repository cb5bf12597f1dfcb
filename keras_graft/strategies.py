"""tf.distribute strategies by name, for GraftTrainer and the example scripts.

``get("default" | "mirrored" | "multi_worker")`` or a strategy object (returned as is); None is the current
strategy. "mirrored" uses every GPU, or every logical CPU device when there is no GPU (tests split the CPU into
two). "multi_worker" reads the cluster from the ``TF_CONFIG`` environment variable; create it at the start of the
program, before TensorFlow runs any op.
"""

import tensorflow as tf

NAMES = ("default", "mirrored", "multi_worker")


def local_devices():
    """Names of the GPUs, or of the logical CPU devices when there is no GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def get(strategy=None):
    """A ``tf.distribute.Strategy`` from a name, a strategy object, or None (the current strategy)."""
    if strategy is None or strategy == "default":
        return tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy(local_devices())
    if strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy {strategy!r}: pass a tf.distribute.Strategy or one of {list(NAMES)}.")


def is_multi_worker(strategy):
    """True when the strategy spans several worker processes."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(tasks) for job, tasks in spec.items() if job in ("chief", "worker")) > 1
