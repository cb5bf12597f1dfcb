"""Filter grafting between processes: each trains its own model with model.fit; they graft through a directory.

Launch N local processes (one GPU each where there are GPUs) that graft in a ring at the end of every epoch:

    python examples/graft_processes.py --num_processes=2 --epochs=3

Each prints its epochs as ``[rank k] ...`` and the launcher ends with every rank's final test accuracy. On N
hosts that share a directory (NFS, or a bucket tf.io.gfile reaches), run one rank per host instead:

    python examples/graft_processes.py --rank=K --world_size=N --dir=gs://my-bucket/graft-run-1 --epochs=200

The peers are made diverse as in the paper: rank k (0-based) starts at learning rate
``lr * (1 + cos(pi * (N - k - 1) / N)) / 2`` with cosine annealing, and reads the data in its own order.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from keras_graft import Grafting
from keras_graft import datasets
from keras_graft import models
from keras_graft import schedules
from keras_graft.shared_directory import SharedDirectory

flags.DEFINE_integer("num_processes", 2, "Local processes to launch (ignored with --rank).")
flags.DEFINE_integer("rank", -1, "Run only this rank (for one process per host); -1 launches --num_processes.")
flags.DEFINE_integer("world_size", None, "Number of ranks, with --rank.")
flags.DEFINE_string("dir", None, "Shared directory (local, NFS, gs://...). Default: a new temporary directory, "
                    "deleted at the end (local launch only).")
flags.DEFINE_integer("epochs", 3, "Epochs; the ranks graft after each.")
flags.DEFINE_string("model", "resnet20", f"Network: one of {', '.join(models.available())}.")
flags.DEFINE_enum("dataset", "fashion_mnist_local", ["fashion_mnist_local", "fashion_mnist", "cifar10", "cifar100",
                                                     "synthetic"],
                  "Training data; synthetic: random images and labels, for a quick run without data.")
flags.DEFINE_integer("subset", 4096, "Training examples per epoch (the first ones of the split); 0: all.")
flags.DEFINE_integer("test_subset", 2000, "Test examples; 0: all.")
flags.DEFINE_integer("image_size", None, "Pad the images to this size (32 for MobileNetV2 or VGG on Fashion-MNIST).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("lr", 0.1, "Learning rate of the last rank (SGD, momentum 0.9); the others start lower.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay.")
flags.DEFINE_integer("seed", 0, "Rank k shuffles with seed + k.")
flags.DEFINE_float("timeout", 600.0, "Seconds a rank waits for its peer's weights before giving up.")
flags.DEFINE_string("gpus", "auto", "GPUs to pin the local ranks to, round robin: 'auto' (CUDA_VISIBLE_DEVICES or "
                    "every GPU nvidia-smi lists), 'none', or a list such as '0,1'.")
flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads of this rank; 0: TensorFlow's default. "
                     "The launcher splits the CPU cores between ranks that share the CPU.")

FLAGS = flags.FLAGS

_RESULT = "RESULT "
_SYNTHETIC_SHAPE = (28, 28, 1)
_SYNTHETIC_CLASSES = 10


def _gpu_ids():
    """IDs of the GPUs to pin ranks to (possibly empty)."""
    if FLAGS.gpus == "none":
        return []
    if FLAGS.gpus != "auto":
        return [g.strip() for g in FLAGS.gpus.split(",") if g.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False)
    return listing.stdout.split() if listing.returncode == 0 else []


def _data(split, training, seed):
    """(dataset, num_classes, input_shape) of the chosen data."""
    subset = (FLAGS.subset if training else FLAGS.test_subset) or None
    if FLAGS.dataset == "synthetic":
        rng = np.random.default_rng(seed if training else 10_000)
        size = subset or 4096
        x = rng.normal(size=(size, *_SYNTHETIC_SHAPE)).astype("float32")
        y = rng.integers(0, _SYNTHETIC_CLASSES, size=size).astype("int32")
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        if training:
            ds = ds.shuffle(size, seed=seed)
        return ds.batch(FLAGS.batch_size), _SYNTHETIC_CLASSES, _SYNTHETIC_SHAPE
    info = datasets.info(FLAGS.dataset, image_size=FLAGS.image_size)
    ds = datasets.load(FLAGS.dataset, split, FLAGS.batch_size, training=training, shuffle_seed=seed, subset=subset,
                       image_size=FLAGS.image_size)
    return ds, info.num_classes, info.input_shape


def train_rank(rank, world_size, directory):
    """Trains rank ``rank`` with model.fit, grafting through ``directory``; returns its final test metrics."""
    if FLAGS.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    train, num_classes, input_shape = _data("train", True, FLAGS.seed + rank)
    test, _, _ = _data("test", False, None)
    steps_per_epoch = int(train.cardinality())
    model = models.get(FLAGS.model, num_classes=num_classes, input_shape=input_shape,
                       weight_decay=FLAGS.weight_decay)
    learning_rate = schedules.spread_learning_rates(FLAGS.lr, world_size)[rank]
    model.compile(
        optimizer=keras.optimizers.SGD(
            schedules.CosineAnnealing(learning_rate, FLAGS.epochs, steps_per_epoch), momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    peers = SharedDirectory(directory, rank, world_size, timeout=FLAGS.timeout)
    logging.info("Rank %d of %d: %s, initial learning rate %.4f, grafting from rank %d through %s.", rank,
                 world_size, FLAGS.model, learning_rate, peers.peer_rank, directory)
    model.fit(train, epochs=FLAGS.epochs, validation_data=test, callbacks=[Grafting(peers=peers, verbose=1)],
              verbose=2)
    loss, accuracy = model.evaluate(test, verbose=0)
    return {"rank": rank, "test_accuracy": float(accuracy), "test_loss": float(loss)}


def _forward(process, rank, results):
    """Copies a rank's output with a '[rank k]' prefix and keeps its result line."""
    for line in process.stdout:
        if line.startswith(_RESULT):
            results[rank] = json.loads(line[len(_RESULT):])
        else:
            sys.stdout.write(f"[rank {rank}] {line}")
            sys.stdout.flush()


def _wait_all(processes):
    """Waits for every process; once one fails, stops the others (they would wait for it until the timeout).

    Returns the ranks that failed.
    """
    running = set(range(len(processes)))
    failed = []
    while running and not failed:
        time.sleep(0.5)
        for rank in sorted(running):
            code = processes[rank].poll()
            if code is not None:
                running.discard(rank)
                if code:
                    failed.append(rank)
    for rank in running:
        processes[rank].terminate()
        processes[rank].wait()
    return failed


def launch(num_processes):
    """Starts one process per rank, waits for all, prints each rank's final accuracy."""
    if num_processes < 2:
        raise app.UsageError("--num_processes must be at least 2: grafting needs a peer.")
    directory = FLAGS.dir or tempfile.mkdtemp(prefix="graft_processes_")
    gpus = _gpu_ids()
    sharing_cpu = not gpus
    threads = max(1, (os.cpu_count() or 1) // num_processes) if sharing_cpu else 0
    processes, readers, results = [], [], {}
    for rank in range(num_processes):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
            if num_processes > len(gpus):
                env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"  # ranks share a GPU
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--rank={rank}",
                   f"--world_size={num_processes}", f"--dir={directory}", f"--intra_op_threads={threads}"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        reader = threading.Thread(target=_forward, args=(process, rank, results), daemon=True)
        reader.start()
        processes.append(process)
        readers.append(reader)
        logging.info("Started rank %d (pid %d%s).", rank, process.pid,
                     f", GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else f", {threads} CPU threads")
    failed = _wait_all(processes)
    for reader in readers:
        reader.join()
    if not FLAGS.dir:
        shutil.rmtree(directory, ignore_errors=True)
    for rank in sorted(results):
        print(json.dumps(results[rank]))
    if failed:
        raise SystemExit(f"Ranks {failed} failed; see their output above.")
    accuracies = [results[rank]["test_accuracy"] for rank in range(num_processes)]
    print(f"Final test accuracy per rank: {', '.join(f'{a:.4f}' for a in accuracies)} "
          f"(mean {np.mean(accuracies):.4f}, {FLAGS.epochs} epochs of {FLAGS.model} on {FLAGS.dataset}).")


def main(argv):
    del argv
    if FLAGS.rank < 0:
        launch(FLAGS.num_processes)
        return
    if FLAGS.world_size is None or FLAGS.dir is None:
        raise app.UsageError("--rank needs --world_size and --dir (the directory all ranks share).")
    result = train_rank(FLAGS.rank, FLAGS.world_size, FLAGS.dir)
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
