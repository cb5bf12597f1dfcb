"""Training throughput of GraftTrainer with N = 1, 2, 4 CIFAR ResNet-32 peers in one program.

    python benchmarks/throughput.py [--num_models=1,2,4] [--steps=8] [--rounds=3] [--batch_size=128]

CIFAR-shaped synthetic data (32x32x3, 10 classes), SGD with momentum 0.9 and weight decay 5e-4 as in the papers,
batch 128 per model. Each N runs in a fresh process and prints one JSON line:

* ``step_s``, ``step_min_s``: median and fastest seconds per training step of all N models (each its own batch),
  over ``--steps`` steps of one ``fit`` epoch after ``--warmup`` untimed ones (tracing, first run);
* ``images_per_s_per_model``, ``images_per_s_total``: batch / step and N x batch / step, from the median;
* ``peak_rss_mb``: the process' peak resident memory (``resource.getrusage`` maxrss) after that epoch, with only
  the N models built;
* ``graft_s``: one ring graft of the N models (median of 3 after a warm-up), for N >= 2;
* ``ratio_to_n_single``: step(N) / (N x step(1)), 1.0 when N models cost exactly N single-model steps. On a shared
  machine other processes' load changes from minute to minute, so the process then builds a single-model
  GraftTrainer too and alternates short ``fit`` calls of both for ``--rounds`` rounds (``--round_steps`` steps
  each); the ratio compares their fastest steps, measured under the same load.

With ``--keras_fit`` (default) a last line, ``figure: keras_fit``, times one model trained by Keras' own
``model.fit`` (same data, optimizer and loss); its ``ratio_to_n_single`` is Keras' step over GraftTrainer's N = 1
step, measured the same way (above 1: the custom loop is faster).

For scale on the 2-core development machine: the reference PyTorch script trains one ResNet-32 at about 211
images/s, and two of its processes side by side at about 134 images/s in total.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_list("num_models", ["1", "2", "4"], "Numbers of peer models to measure, each in its own process.")
flags.DEFINE_integer("steps", 8, "Timed training steps for the throughput figures.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing and the first run of the compiled step).")
flags.DEFINE_integer("rounds", 3, "Alternating rounds for the ratio to a single model.")
flags.DEFINE_integer("round_steps", 4, "Steps per fit call in each round (the first is not timed).")
flags.DEFINE_integer("batch_size", 128, "Batch per model.")
flags.DEFINE_integer("depth", 32, "CIFAR ResNet depth.")
flags.DEFINE_boolean("keras_fit", True, "Also time one model trained with Keras' model.fit.")
flags.DEFINE_integer("child", None, "Internal: measure this N in this process (0: Keras' model.fit).")

FLAGS = flags.FLAGS


def _step_times(fit, skip):
    """Seconds per step of ``fit(callbacks)`` after the first ``skip`` steps, from batch end to batch end."""
    import keras
    import numpy as np

    ends = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda step, logs: ends.append(time.perf_counter()))
    fit([timer])
    return np.diff(ends[max(skip, 1) - 1:]).tolist()


def _measure(num_models):
    """Figures of one N (0: Keras' model.fit of one model) measured in this process, as a dict."""
    import keras
    import numpy as np

    from keras_graft import grafting
    from keras_graft import models
    from keras_graft.trainer import GraftTrainer

    batch = FLAGS.batch_size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * (FLAGS.warmup + FLAGS.steps), 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build():
        return models.cifar_resnet(FLAGS.depth, weight_decay=5e-4)

    def trainer_fit(n):
        trainer = GraftTrainer(build, n, optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss,
                               metrics=["accuracy"], seed=0)
        return trainer, lambda callbacks, steps=None: trainer.fit(
            (x, y), epochs=1, batch_size=batch, steps_per_epoch=steps, callbacks=callbacks, verbose=0)

    if num_models == 0:
        model = build()
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss, metrics=["accuracy"], jit_compile=False)

        def subject(callbacks, steps=None):
            return model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps, callbacks=callbacks,
                             verbose=0)
    else:
        trainer, subject = trainer_fit(num_models)
    times = _step_times(subject, FLAGS.warmup)
    n = max(num_models, 1)
    figures = {
        "figure": "train_step" if num_models else "keras_fit",
        "model": f"resnet{FLAGS.depth}",
        "num_models": n,
        "batch_size": batch,
        "step_s": round(statistics.median(times), 4),
        "step_min_s": round(min(times), 4),
        "images_per_s_per_model": round(batch / statistics.median(times), 1),
        "images_per_s_total": round(n * batch / statistics.median(times), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if num_models >= 2:
        ring = grafting.RingGrafter(trainer.models)
        ring()
        graft_times = []
        for _ in range(3):
            start = time.perf_counter()
            ring()
            graft_times.append(time.perf_counter() - start)
        figures["graft_s"] = round(statistics.median(graft_times), 4)
    figures["ratio_to_n_single"] = 1.0
    if num_models != 1:
        _, reference = trainer_fit(1)
        reference([], FLAGS.warmup)  # Traces the reference's step outside the timed rounds.
        own, single = [], []
        for _ in range(FLAGS.rounds):
            own += _step_times(lambda callbacks: subject(callbacks, FLAGS.round_steps), 1)
            single += _step_times(lambda callbacks: reference(callbacks, FLAGS.round_steps), 1)
        figures["ratio_to_n_single"] = round(min(own) / (n * min(single)), 3)
    return figures


def main(argv):
    del argv
    if FLAGS.child is not None:
        print(json.dumps(_measure(FLAGS.child)), flush=True)
        return
    for n in FLAGS.num_models + (["0"] if FLAGS.keras_fit else []):
        flags_passed = [f"--{name}={getattr(FLAGS, name)}"
                        for name in ("steps", "warmup", "rounds", "round_steps", "batch_size", "depth")]
        result = subprocess.run([sys.executable, __file__, f"--child={n}", *flags_passed], capture_output=True,
                                text=True, check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if result.returncode:
            sys.exit(f"N={n} failed:\n{result.stderr[-3000:]}")
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    app.run(main)
