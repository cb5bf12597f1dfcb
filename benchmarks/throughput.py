"""Training throughput of GraftTrainer with N = 1, 2, 4 CIFAR ResNet-32 peers in one program.

    python benchmarks/throughput.py [--num_models=1,2,4] [--steps=6] [--warmup=2] [--batch_size=128]

Each N runs in a fresh process (so peak memory is its own): CIFAR-shaped synthetic data (32x32x3, 10 classes),
SGD with momentum 0.9, weight decay 5e-4 as in the papers, one ``fit`` epoch of ``warmup + steps`` steps; the
step time is the median over the timed steps (the first ``warmup`` build the compiled step). Prints one JSON line
per N:

* ``step_s``: seconds per training step of all N models (each its own batch of ``batch_size``);
* ``images_per_s_per_model`` and ``images_per_s_total`` (N x batch / step);
* ``ratio_to_n_single``: step_s(N) / (N x step_s(1)), 1.0 when N models cost exactly N single steps;
* ``peak_rss_mb``: the process' peak resident memory (``resource.getrusage`` maxrss).
* ``graft_s``: one ring graft of the N models (median of 3 after a warm-up), for N >= 2.

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
flags.DEFINE_integer("steps", 6, "Timed training steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing and the first run of the compiled step).")
flags.DEFINE_integer("batch_size", 128, "Batch per model.")
flags.DEFINE_integer("depth", 32, "CIFAR ResNet depth.")
flags.DEFINE_boolean("child", False, "Internal: measure one value of --num_models in this process.")

FLAGS = flags.FLAGS


def _measure(num_models):
    """Runs one N in this process and returns its figures as a dict."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_graft import grafting
    from keras_graft import models
    from keras_graft.trainer import GraftTrainer

    batch, steps = FLAGS.batch_size, FLAGS.warmup + FLAGS.steps
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch * steps)
    trainer = GraftTrainer(
        lambda: models.cifar_resnet(FLAGS.depth, weight_decay=5e-4), num_models,
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"], seed=0)

    ends = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda step, logs: ends.append(time.perf_counter()))
    trainer.fit((x, y), epochs=1, batch_size=batch, callbacks=[timer], verbose=0)
    step_s = statistics.median(np.diff(ends[FLAGS.warmup - 1:]))
    figures = {
        "figure": "train_step",
        "model": f"resnet{FLAGS.depth}",
        "num_models": num_models,
        "batch_size": batch,
        "threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
        "step_s": round(step_s, 4),
        "images_per_s_per_model": round(batch / step_s, 1),
        "images_per_s_total": round(num_models * batch / step_s, 1),
    }
    if num_models >= 2:
        ring = grafting.RingGrafter(trainer.models)
        ring()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            ring()
            times.append(time.perf_counter() - start)
        figures["graft_s"] = round(statistics.median(times), 4)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(_measure(int(FLAGS.num_models[0]))), flush=True)
        return
    single_step = None
    for n in FLAGS.num_models:
        command = [sys.executable, __file__, "--child", f"--num_models={n}", f"--steps={FLAGS.steps}",
                   f"--warmup={FLAGS.warmup}", f"--batch_size={FLAGS.batch_size}", f"--depth={FLAGS.depth}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if result.returncode:
            sys.exit(f"N={n} failed:\n{result.stderr[-3000:]}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        if figures["num_models"] == 1:
            single_step = figures["step_s"]
        if single_step is not None:
            figures["ratio_to_n_single"] = round(figures["step_s"] / (figures["num_models"] * single_step), 3)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    app.run(main)
