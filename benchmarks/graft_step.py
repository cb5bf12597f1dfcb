"""Seconds per graft between two ResNet-56 models: in one process, and one round through a shared directory.

    python benchmarks/graft_step.py [--repeats=20] [--dir=/path/on/nfs]

Prints one JSON line per figure:

* ``graft_model``: ``Grafter.graft_model``, the in-process graft (one compiled function over all weights).
* ``shared_directory_round``: ``SharedDirectory.graft_round`` of rank 0 with its peer's file already written:
  publish its own weights (write a temporary file, rename), find and load the peer's file, graft it, delete old
  rounds. The reference code's equivalent costs 0.18 s plus up to 10 s of polling.

Each figure is the median over ``--repeats`` timed runs after ``--warmup`` untimed ones (the first builds the
compiled graft).
"""

import json
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags

from keras_graft import models
from keras_graft.grafting import Grafter
from keras_graft.shared_directory import SharedDirectory

flags.DEFINE_integer("repeats", 20, "Timed runs per figure.")
flags.DEFINE_integer("warmup", 3, "Untimed runs before timing.")
flags.DEFINE_string("dir", None, "Shared directory for the round; default: a temporary directory, deleted after.")

FLAGS = flags.FLAGS


def _median_seconds(step, prepare=lambda i: None):
    """Median and minimum wall time of ``step(i)`` over the timed runs, each after an untimed ``prepare(i)``.

    ``i`` counts all runs, warm-up included.
    """
    times = []
    for i in range(FLAGS.warmup + FLAGS.repeats):
        prepare(i)
        start = time.perf_counter()
        step(i)
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def _report(figure, model, median, fastest, **extra):
    print(json.dumps({"figure": figure, "model": model.name, "weights": int(model.count_params()),
                      "median_s": round(median, 5), "min_s": round(fastest, 5), "repeats": FLAGS.repeats, **extra}),
          flush=True)


def main(argv):
    del argv
    model, peer = models.cifar_resnet(56), models.cifar_resnet(56)

    grafter = Grafter(model)
    in_process, fastest = _median_seconds(lambda i: grafter.graft_model(peer))
    _report("graft_model", model, in_process, fastest)

    directory = FLAGS.dir or tempfile.mkdtemp(prefix="graft_step_")
    own, other = SharedDirectory(directory, 0, 2), SharedDirectory(directory, 1, 2)
    own.setup(model)

    # The peer's file is written (untimed) before rank 0's round, so the round finds it ready.
    shared, fastest = _median_seconds(lambda i: own.graft_round(grafter, i), prepare=lambda i: other.publish(peer, i))
    with open(own.filename(FLAGS.warmup + FLAGS.repeats - 1), "rb") as f:
        file_mb = len(f.read()) / 2**20
    _report("shared_directory_round", model, shared, fastest, file_mb=round(file_mb, 2),
            ratio_to_graft_model=round(shared / in_process, 2))
    if not FLAGS.dir:
        shutil.rmtree(directory)


if __name__ == "__main__":
    app.run(main)
