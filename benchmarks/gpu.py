"""GPU throughput of GraftTrainer: images/s, graft time and peak memory for ResNet-32/56 with N peers.

    python benchmarks/gpu.py            # on a GPU machine: ResNet-32 and -56, N = 1, 2, 4, 8, float32 and
                                        # mixed_float16; about 7 minutes, never more than --budget_s + one config
    python benchmarks/gpu.py --tiny     # CPU smoke run: tiny width/batch, N = 1, 2, a few steps

Synthetic CIFAR-shaped data (32x32x3 float32 images, 10 classes), generated on the device once per config: no
download, no input pipeline cost. Every config builds a fresh ``GraftTrainer`` of N models (``Grafting()`` when
N > 1, entropy criterion, layer level), SGD(0.1, momentum 0.9), batch 128 per model, coupled weight decay 5e-4,
and prints one JSON line:

* ``images_per_s``: training images per second summed over the N models (N * batch * steps / seconds), timed
  from the end of the warm-up steps (the first traces and compiles the step) to the end of the last step, with
  the device synchronised at both ends (the step's loss is read back to the host). ``images_per_s_per_model``
  divides it by N; ``step_ms`` is the time of one step of all N models.
* ``graft_ms``: median wall time of one ring graft of the N models (``keras_graft.RingGrafter``, one compiled
  function over all variables, the same graft GraftTrainer runs at the end of every epoch), after one untimed
  call that compiles it.
* ``peak_memory_mb``: ``tf.config.experimental.get_memory_info("GPU:0")["peak"]`` after the config, reset before
  it (models, optimizer slots, activations of the step, the graft).
* ``graft_ok`` (mixed precision check): after the timed steps and one graft, every weight is finite, the logged
  loss is finite and, for N = 2, the two models are equal (a 2-model graft makes them so, since arctan is odd).
  With ``mixed_float16`` the models compute in float16 and keep float32 variables (Keras' policy); the trainer's
  loop does not scale the loss, so small gradients may underflow in long trainings (``loss_scaling: false``).

Each config is time-boxed (``--config_seconds`` of timed steps, at most ``--steps``); configs that cannot start
before ``--budget_s`` are printed as ``{"skipped": ...}`` lines. Order: ResNet-32 before ResNet-56, N ascending,
float32 then mixed for each N, so a cut-off run keeps the most informative pairs.
"""

import json
import statistics
import time

from absl import app
from absl import flags
from absl import logging

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import models
from keras_graft.trainer import GraftTrainer

flags.DEFINE_bool("tiny", False, "CPU smoke run: ResNet-8 of width 4, batch 16, N = 1, 2, 3 timed steps.")
flags.DEFINE_list("depths", ["32", "56"], "CIFAR ResNet depths.")
flags.DEFINE_list("peers", ["1", "2", "4", "8"], "Numbers of models N in one GraftTrainer.")
flags.DEFINE_list("precisions", ["float32", "mixed_float16"], "Keras dtype policies.")
flags.DEFINE_integer("width", 16, "Filters of the first stage (16: the paper's ResNets).")
flags.DEFINE_integer("batch_size", 128, "Batch per model.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (the first compiles).")
flags.DEFINE_integer("steps", 60, "At most this many timed steps per config.")
flags.DEFINE_float("config_seconds", 12.0, "Stop timing a config after this many seconds of timed steps.")
flags.DEFINE_integer("graft_repeats", 5, "Timed graft rounds per config (median).")
flags.DEFINE_float("budget_s", 400.0, "Start no config after this many seconds (the script then prints the rest "
                   "as skipped); the last config may run past it.")

FLAGS = flags.FLAGS


class _StepTimer(keras.callbacks.Callback):
    """Synchronises after the warm-up and every later step; stops the epoch when the time box is used up."""

    def __init__(self, warmup, time_box):
        super().__init__()
        self.warmup = warmup
        self.time_box = time_box
        self.start = None
        self.end = None
        self.timed_steps = 0
        self.last_loss = None

    def on_train_batch_end(self, batch, logs=None):
        self.last_loss = float(logs["loss"])  # reading the value waits for the device
        now = time.perf_counter()
        if batch + 1 == self.warmup:
            self.start = now
        elif batch + 1 > self.warmup:
            self.timed_steps += 1
            self.end = now
            if now - self.start > self.time_box:
                self.model.stop_training = True


def _synthetic_fn(batch_size, steps, seed):
    """(model_index, input_context) -> a dataset repeating a few random CIFAR-shaped batches."""

    def fn(model_index, input_context):
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        generator = tf.random.Generator.from_seed(seed + int(model_index))
        x = generator.normal([4 * per_replica, 32, 32, 3])
        y = generator.uniform([4 * per_replica], 0, 10, dtype=tf.int32)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(per_replica, drop_remainder=True).repeat().take(
            steps)

    return fn


def _gpu_available():
    return bool(tf.config.list_physical_devices("GPU"))


def _memory(reset=False):
    if not _gpu_available():
        return None
    if reset:
        tf.config.experimental.reset_memory_stats("GPU:0")
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def _graft_ok(trainer, num_models, loss):
    finite = all(np.all(np.isfinite(w)) for model in trainer.models for w in model.get_weights())
    equal = None
    if num_models == 2:
        equal = all(np.allclose(a, b, rtol=1e-5, atol=1e-6)
                    for a, b in zip(trainer.models[0].get_weights(), trainer.models[1].get_weights()))
    ok = finite and np.isfinite(loss) and equal is not False
    return bool(ok), {"weights_finite": bool(finite), "loss_finite": bool(np.isfinite(loss)),
                      "models_equal_after_graft": equal}


def run_config(depth, num_models, precision, device_name):
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    _memory(reset=True)
    width, batch = FLAGS.width, FLAGS.batch_size
    total_steps = FLAGS.warmup + FLAGS.steps
    build_start = time.perf_counter()
    trainer = GraftTrainer(
        lambda: models.cifar_resnet(depth, width=width, weight_decay=5e-4), num_models=num_models,
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
        grafting=keras_graft.Grafting() if num_models > 1 else None, seed=0)
    timer = _StepTimer(FLAGS.warmup, FLAGS.config_seconds)
    # One epoch: warm-up, timed steps, then the trainer's own end-of-epoch graft.
    trainer.fit(_synthetic_fn(batch, total_steps, seed=depth), epochs=1, steps_per_epoch=total_steps,
                callbacks=[timer], verbose=0)
    fit_seconds = time.perf_counter() - build_start
    seconds = (timer.end - timer.start) if timer.timed_steps else float("nan")
    record = {
        "figure": "graft_trainer_throughput", "device": device_name, "model": f"resnet{depth}", "width": width,
        "num_models": num_models, "precision": precision, "batch_per_model": batch,
        "compute_dtype": trainer.models[0].compute_dtype, "variable_dtype": trainer.models[0].variable_dtype,
        "timed_steps": timer.timed_steps, "timed_seconds": round(seconds, 4),
        "images_per_s": round(num_models * batch * timer.timed_steps / seconds, 1) if timer.timed_steps else None,
        "step_ms": round(1000 * seconds / timer.timed_steps, 3) if timer.timed_steps else None,
        "setup_and_fit_s": round(fit_seconds, 2), "loss_scaling": False,
    }
    if record["images_per_s"]:
        record["images_per_s_per_model"] = round(record["images_per_s"] / num_models, 1)
    if num_models > 1:
        ring = keras_graft.RingGrafter(trainer.models)
        ring()  # compiles
        times = []
        for _ in range(FLAGS.graft_repeats):
            start = time.perf_counter()
            results = ring()  # returns host values: the graft has finished
            times.append(time.perf_counter() - start)
        record["graft_ms"] = round(1000 * statistics.median(times), 3)
        record["graft_alpha"] = round(float(np.mean([r.mean_alpha for r in results])), 4)
    ok, details = _graft_ok(trainer, num_models, timer.last_loss)
    record.update({"graft_ok": ok, **details, "last_loss": timer.last_loss,
                   "peak_memory_mb": None if _memory() is None else round(_memory(), 1)})
    return record


def main(argv):
    del argv
    if FLAGS.tiny:
        FLAGS.depths, FLAGS.peers, FLAGS.width, FLAGS.batch_size = ["8"], ["1", "2"], 4, 16
        FLAGS.warmup, FLAGS.steps, FLAGS.config_seconds, FLAGS.graft_repeats = 1, 3, 10.0, 2
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            for gpu in gpus:
                tf.config.experimental.set_memory_growth(gpu, True)  # so that peak memory is what a config used
        except RuntimeError as error:  # the GPUs were initialised already
            logging.warning("Memory growth not set (%s); peak memory is still reset per config.", error)
        details = tf.config.experimental.get_device_details(gpus[0])
        device_name = details.get("device_name", "GPU:0")
    else:
        device_name = "CPU (no GPU found)"
        if not FLAGS.tiny:
            logging.warning("No GPU: the full configs would take long on a CPU; use --tiny for a smoke run.")
    print(json.dumps({"figure": "environment", "device": device_name, "tensorflow": tf.__version__,
                      "keras": keras.__version__, "tiny": FLAGS.tiny}), flush=True)
    start = time.perf_counter()
    configs = [(int(d), int(n), p) for d in FLAGS.depths for n in FLAGS.peers for p in FLAGS.precisions]
    for depth, num_models, precision in configs:
        elapsed = time.perf_counter() - start
        if elapsed > FLAGS.budget_s:
            print(json.dumps({"figure": "graft_trainer_throughput", "model": f"resnet{depth}",
                              "num_models": num_models, "precision": precision,
                              "skipped": f"time budget ({FLAGS.budget_s:g} s) used up at {elapsed:.0f} s"}),
                  flush=True)
            continue
        logging.info("resnet%d, N=%d, %s (%.0f s elapsed)", depth, num_models, precision, elapsed)
        try:
            record = run_config(depth, num_models, precision, device_name)
        except (tf.errors.ResourceExhaustedError, tf.errors.InternalError) as error:
            record = {"figure": "graft_trainer_throughput", "model": f"resnet{depth}", "num_models": num_models,
                      "precision": precision, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(json.dumps(record), flush=True)
    keras.mixed_precision.set_global_policy("float32")
    print(json.dumps({"figure": "total", "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    app.run(main)
