"""Quick start: filter grafting against a baseline on Fashion-MNIST, in a few minutes on a CPU.

    python examples/quickstart.py            # about 5 minutes on 2 CPU cores
    python examples/quickstart.py --tiny     # a smoke test of the whole path (well under a minute)

Trains, on a fixed subset of Fashion-MNIST, a small CIFAR-style ResNet (ResNet-20 with 8 filters in the first
stage) twice, with the same budget per model (SGD with momentum, cosine annealing, coupled weight decay 5e-4):

1. baseline: one model;
2. grafting: two models that train side by side, with learning rates spread as in the paper, and graft each
   other's weights (entropy criterion, layer level) at the end of every epoch.

Each epoch prints one line; its test accuracy is measured on the first --val_subset test images (2000), to keep
epochs short, while the final table uses all --test_subset images (all 10000 by default). The grafting lines also
show the round that opened the epoch: |a-0.5| (how unequal the mix was) and the peers' distance before it.

Then prints a table (test accuracy per model and of the ensemble, invalid filters with L1 norm below 0.1 and 0.01)
and writes, under --output_dir (default runs/quickstart): filters.png (the filters' L1 norms and the accuracy
curves), results.json (both runs), and each run's weights and CSV log in baseline/ and graft/.

The data: the IDX files of the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, or
$FASHION_MNIST_DIR) when they are there, otherwise tensorflow-datasets' fashion_mnist (prepare it once with
`tfds build fashion_mnist` on a machine with internet access).
"""

import os
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from keras_graft import datasets  # noqa: E402
from keras_graft import experiment  # noqa: E402
from keras_graft.experiment import plots  # noqa: E402

flags.DEFINE_string("output_dir", os.path.join("runs", "quickstart"), "Where to write the plot, results and weights.")
flags.DEFINE_bool("tiny", False, "A tiny run (ResNet-8 of width 4, 512 images, 2 epochs: one graft round) that "
                  "checks every step.")
flags.DEFINE_string("model", None, "Network (default resnet20; resnet8 with --tiny).")
flags.DEFINE_integer("width", None, "Filters of the ResNet's first stage (default 8; 4 with --tiny).")
flags.DEFINE_integer("epochs", None, "Epochs per model (default 6; 2 with --tiny). A graft round runs between two "
                     "epochs, so 1 epoch grafts nothing.")
flags.DEFINE_integer("train_subset", None, "Training images: the first N of the training split (default 8192).")
flags.DEFINE_integer("test_subset", None, "Test images for the final table (default all 10000).")
flags.DEFINE_integer("val_subset", None, "Test images evaluated after every epoch for the curves (default 2000).")
flags.DEFINE_float("lr", 0.1, "Initial learning rate (the baseline's, and the second grafting model's).")
flags.DEFINE_integer("seed", 0, "Seed of the initialisation, data order and augmentation.")

FLAGS = flags.FLAGS

_DEFAULTS = dict(model="resnet20", width=8, epochs=6, train_subset=8192, test_subset=None, val_subset=2000)
_TINY = dict(model="resnet8", width=4, epochs=2, train_subset=512, test_subset=512, val_subset=256)


def say(message=""):
    print(message, flush=True)


def local_fashion_mnist():
    """The folder with the four Fashion-MNIST IDX files, or None."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for folder in datasets.fashion_mnist_search_paths():
        if all(os.path.isfile(os.path.join(folder, s)) or os.path.isfile(os.path.join(folder, s + ".gz"))
               for s in stems):
            return folder
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    start = time.perf_counter()
    preset = _TINY if FLAGS.tiny else _DEFAULTS
    settings = {key: FLAGS[key].value if FLAGS[key].value is not None else value for key, value in preset.items()}
    folder = local_fashion_mnist()
    if folder:
        dataset = "fashion_mnist_local"
        say(f"Fashion-MNIST: the IDX files in {folder}.")
    else:
        dataset = "fashion_mnist"
        say("Fashion-MNIST: no local IDX files (apt-get install dataset-fashion-mnist), so tensorflow-datasets.")
    out = FLAGS.output_dir
    common = dict(model=settings["model"], width=settings["width"], dataset=dataset, epochs=settings["epochs"],
                  batch_size=128 if not FLAGS.tiny else 64, lr=FLAGS.lr, schedule="cosine", seed=FLAGS.seed,
                  train_subset=settings["train_subset"], test_subset=settings["test_subset"],
                  val_subset=settings["val_subset"], tensorboard=False)
    runs = [
        ("baseline", experiment.Config(method="baseline", output=os.path.join(out, "baseline", "results.json"),
                                       **common)),
        ("graft", experiment.Config(method="graft", num_models=2, lr_spread=True,
                                    output=os.path.join(out, "graft", "results.json"), **common)),
    ]
    final_images = f"the first {settings['test_subset']}" if settings["test_subset"] else "all 10000"
    epoch_images = settings["val_subset"] or settings["test_subset"]
    say(f"Training {settings['model']} (width {settings['width']}) on {settings['train_subset']} images for "
        f"{settings['epochs']} epoch{'s' if settings['epochs'] != 1 else ''}: a baseline, then 2 models grafting. "
        f"Each line is one epoch; its test accuracy uses "
        + (f"the first {epoch_images} test images" if epoch_images else "all 10000 test images")
        + f", the final table {final_images}.\n")

    results = {}
    for index, (name, cfg) in enumerate(runs, 1):
        say(f"[{index}/{len(runs)}] {name}")
        try:  # The quick start owns its output folder: a new run replaces the whole of it.
            results[name] = experiment.run(cfg, log=lambda line, name=name: say(f"  {line}"), overwrite=True)
        except (ValueError, FileNotFoundError) as e:
            raise experiment.ScriptError("quickstart.py", str(e)) from e
        say(f"  done in {results[name]['fit_seconds']:.0f} s\n")

    baseline, graft = results["baseline"], results["graft"]
    say(f"Test accuracy on {final_images} test images (not the per-epoch subset), and filters whose L1 norm is "
        "below 0.1 / 0.01 (invalid filters):\n")
    say(experiment.format_table([baseline, graft], ["baseline", "graft"]))
    gain = 100 * (graft["mean_accuracy"] - baseline["mean_accuracy"])
    rounds = sum(1 for layers in graft["history"].get("graft_layers", []) if layers)
    say("")
    if not rounds:
        say(textwrap.fill("No graft round ran: rounds run between epochs (none follows the final one), so the "
                          "'graft' models trained independently. Use --epochs=2 or more.", width=100))
    say(textwrap.fill(
        f"Grafting vs baseline: {gain:+.2f} points of test accuracy per model (one seed of a short run: expect "
        "differences of a point or so from the seed alone). Why the two grafted models (and their ensemble) score "
        "almost alike: with 2 models, model 1's coefficients are 1 minus model 0's (arctan is odd), so each graft "
        "leaves both with the same weights; they differ only by the training since the last graft (one epoch, "
        "each with its own learning rate and data order; no graft follows the final epoch). The first graft "
        "averages two differently initialised networks, so epoch 2 starts from near chance (the reference code "
        "does the same): over the papers' 200 epochs that costs little, in a run this short it costs about an "
        "epoch. Runs this short also leave few or no invalid filters; the papers count them after 200 epochs "
        "(ResNet-32 on CIFAR-10: 36 of 1136 filters below 0.1 for the baseline, 14 after grafting).", width=100))

    png = os.path.join(out, "filters.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
        say("\nmatplotlib is not installed (pip install matplotlib, or pip install -e '.[plots]'): no plot.")
    if png:
        entries = []
        for label, r in (("baseline", baseline), ("graft", graft)):
            spec = experiment.ModelSpec.from_dict(r["model_spec"])
            entries.append((label, plots.filter_norms(experiment.load_trained(r["weights"][0], spec))))
        summary = ["", "test accuracy:"]
        summary += [f"  {label} model {k}: {100 * acc:.2f}%" for label, r in (("baseline", baseline), ("graft", graft))
                    for k, acc in enumerate(r["test_accuracy"])]
        summary.append(f"  graft ensemble: {100 * graft['ensemble_accuracy']:.2f}%")
        curves_note = ("graft: each graft leaves models 0 and 1 equal (2 models: alpha_1 = 1 - alpha_0), so they "
                       "differ by one epoch of training and their curves and the ensemble's nearly coincide. "
                       f"Per-epoch accuracy on {epoch_images or 10000} test images.")
        plots.plot_filters(entries, png, logs=[("baseline", baseline["log_csv"]), ("graft", graft["log_csv"])],
                             title=f"Quick start: {baseline['model']} on Fashion-MNIST, baseline vs 2-model grafting",
                             summary=summary, curves_note=curves_note)
    wall = time.perf_counter() - start
    summary_path = os.path.join(out, "results.json")
    experiment.write_json(summary_path, {"dataset": dataset, "settings": settings, "wall_seconds": wall,
                                      "baseline": baseline, "graft": graft, "plot": png})
    say(f"\nWrote {summary_path}" + (f" and {png}" if png else "") + f". Total time {wall / 60:.1f} min.")
    logging.info("Quick start done in %.0f s.", wall)


if __name__ == "__main__":
    app.run(main)
