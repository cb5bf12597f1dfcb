"""Trains CIFAR-style networks with filter grafting, cultivation, mutual learning, RePr, or as a baseline.

The defaults reproduce the papers' CIFAR protocol: ResNet-32 on CIFAR-10, SGD lr 0.1 with momentum 0.9, coupled
(PyTorch-style) weight decay 5e-4, batch 128, 200 epochs, learning rate x0.1 every 60 epochs, random crop with 4
pixels of padding and horizontal flips.

    python examples/train.py --method=baseline                          # 1 ResNet-32
    python examples/train.py --method=graft --num_models=2 --lr_spread --schedule=cosine
    python examples/train.py --method=ensemble --num_models=2           # the fair baseline for grafting
    python examples/train.py --method=graft --source=noise              # the paper's noise ablation (1 model)
    python examples/train.py --method=repr --repr_s1=20 --repr_s2=10
    python examples/train.py --method=baseline --save_model=runs/teacher.keras --model=resnet56
    python examples/train.py --method=cultivate --teacher=runs/teacher.keras
    python examples/train.py --method=mutual --num_models=2
    python examples/train.py --method=graft --dataset=fashion_mnist_local --model=resnet20 --epochs=2 \\
        --train_subset=2000                                             # a quick run on the CPU

Methods: baseline (1 model), graft (N models grafting in a ring every epoch; --source=internal|noise: a scion
from inside each model instead), cultivate (grafting + distillation from a frozen --teacher), mutual (N models
distilling from each other), repr (RePr), ensemble (N independent models and their ensemble).

At the end it prints a table (test accuracy per model and of the ensemble, invalid filters with L1 norm below 0.1
and 0.01) and writes, next to --output, the results as JSON, each model's weights (model_<k>.weights.h5, for
examples/plot_filters.py), and the logs (CSV and TensorBoard) in --log_dir. The default --output is
runs/<method>_<network>_<dataset>[-<setting>=<value>...]/results.json, named after every flag that changes the run
and differs from the method's default (e.g. runs/graft_resnet20_w8_fashion_mnist_local-epochs=2-graft_every=3/), so
two configurations never share a folder; a run refuses to overwrite a results.json written by another
configuration, and names both. Bad or contradictory flags fail before any training with a message; settings that
will run but not do what the method is for (--graft_every larger than the epochs allow: no graft) are warned about.

Each epoch's line shows the graft round that opened it: ``graft |a-0.5|`` (the mean |alpha - 0.5| over the grafted
layers, ``graft_alpha_spread`` in the logs) and ``peer dist`` (||W - W_peer|| / ||W|| before the round,
``graft_peer_distance``). With 2 models the mean alpha is 0.5 by construction, so it is not shown.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from keras_graft import experiment  # noqa: E402

_METHODS_HELP = "; ".join(f"{name}: {text}" for name, text in experiment.METHOD_HELP.items())

flags.DEFINE_enum("method", "baseline", list(experiment.METHODS), f"Training method. {_METHODS_HELP}.")
flags.DEFINE_enum("protocol", "default", list(experiment.PROTOCOLS), "reference: every setting of the reference "
                  "code's grafting run (2 models, 200 epochs, batch 128, SGD 0.1 momentum 0.9, weight decay 5e-4, "
                  "lr x0.1 every 60 epochs, lr spread, entropy, a=0.4, c=500, a graft after every epoch); a flag "
                  "that contradicts it is an error. Needs --method=graft.")
flags.DEFINE_string("model", "resnet32", "Network: one of keras_graft.models.available() (resnet20/32/44/56/110, "
                    "their _leaky variants, convnet3, mobilenetv2, vgg16_bn, wrn28_10), or resnet<6n+2>[_leaky] / "
                    "wrn<6n+4>_<k> for other depths (keras_graft.models.get).")
flags.DEFINE_integer("width", None, "Override the width: filters of a ResNet's first stage (16 in the paper), or a "
                     "wide ResNet's widening factor. Small values give quick runs.")
flags.DEFINE_string("dataset", "cifar10", "Dataset: cifar10, cifar100, fashion_mnist (tensorflow-datasets, else the "
                    "local IDX files), fashion_mnist_local (the IDX files of the Debian package "
                    "dataset-fashion-mnist), imagenet2012.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data folder; for fashion_mnist_local the folder of the "
                    "IDX files (default: found automatically).")
flags.DEFINE_integer("image_size", None, "Pad the images to this size (e.g. 32 to give Fashion-MNIST CIFAR's size).")
flags.DEFINE_integer("num_models", None, "Models trained side by side. Default: 1 for baseline and repr (and graft "
                     "with --source=internal|noise), 2 for graft, cultivate, mutual and ensemble.")
flags.DEFINE_integer("epochs", 200, "Epochs (every model sees the whole training set once per epoch).")
flags.DEFINE_integer("batch_size", 128, "Batch size per model (global, over all replicas).")
flags.DEFINE_float("lr", 0.1, "Initial learning rate of SGD (the last model's with --lr_spread).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_enum("schedule", "step", list(experiment.SCHEDULES), "Learning-rate schedule, per step: step (x0.1 every "
                  "--lr_step_epochs epochs), cosine (annealing to 0 over --epochs), constant.")
flags.DEFINE_integer("lr_step_epochs", 60, "Epochs between the x0.1 drops of --schedule=step.")
flags.DEFINE_bool("lr_spread", None, "Give model k (k = 1..N) the initial rate lr * (1 + cos(pi * (N - k) / N)) / 2 "
                  "(the papers' diversity between peers). Default: on for --method=graft|cultivate between "
                  "networks (the reference's --difflr), off otherwise.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled (PyTorch-style) weight decay, as L2 regularisers in the models.")
# Grafting.
flags.DEFINE_enum("criterion", None, list(experiment.CRITERIA), "Grafting information criterion (default: entropy for "
                  "--level=layer, bn_scale for --level=filter).")
flags.DEFINE_enum("level", None, list(experiment.LEVELS), "Grafting level (default layer).")
flags.DEFINE_float("a", None, "Grafting coefficient range: alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)) "
                   "(default 0.4).")
flags.DEFINE_float("c", None, "Grafting sharpness c (default 500).")
flags.DEFINE_integer("graft_every", None, "Graft every n epochs (default 1).")
flags.DEFINE_enum("source", None, list(experiment.SOURCES), "Grafting's information source (default external): "
                  "external (the peer networks, in a ring), internal (each invalid filter += the layer's "
                  "rank-matched large filter), noise (each invalid filter += Gaussian noise, sigma_t = "
                  "sigma_decay^t).")
flags.DEFINE_float("threshold", None, "--source=internal|noise: L1 norm below which a filter takes the scion "
                   "(default 0.1).")
flags.DEFINE_float("sigma_decay", None, "--source=noise: decay of the noise's standard deviation per epoch "
                   "(default 0.9).")
# Distillation.
flags.DEFINE_string("teacher", None, "--method=cultivate: the frozen teacher, a .keras file (train one with "
                    "--method=baseline --save_model=...).")
flags.DEFINE_float("temperature", None, "Distillation temperature (default 2).")
flags.DEFINE_float("distill_weight", None, "Weight of the distillation term (default 1).")
# RePr.
flags.DEFINE_integer("repr_s1", None, "RePr: epochs (or steps) of full training before each drop (default 20).")
flags.DEFINE_integer("repr_s2", None, "RePr: epochs (or steps) with the dropped filters held at zero (default 10).")
flags.DEFINE_float("repr_ratio", None, "RePr: share of the ranked filters dropped per cycle (default 0.3).")
flags.DEFINE_integer("repr_cycles", None, "RePr: drop/re-initialise cycles (default 3).")
flags.DEFINE_enum("repr_unit", None, list(experiment.REPR_UNITS), "RePr: what --repr_s1/--repr_s2 count (default "
                  "epoch).")
# Runtime.
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], "tf.distribute strategy: default, "
                  "mirrored (every GPU, or the logical CPU devices), multi_worker (the cluster in TF_CONFIG).")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices before TensorFlow starts (for "
                     "--strategy=mirrored on a machine without GPUs); 0 leaves it alone.")
flags.DEFINE_integer("seed", 0, "Seeds the models' initialisation, the data order and augmentation.")
flags.DEFINE_integer("train_subset", None, "Train on the first N training examples only (quick runs).")
flags.DEFINE_integer("test_subset", None, "Evaluate on the first N test examples only (quick runs).")
flags.DEFINE_integer("val_subset", None, "Evaluate after each epoch on the first N test examples only (default: "
                     "--test_subset); the final evaluation uses --test_subset.")
flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: the whole training set).")
flags.DEFINE_bool("validate", True, "Evaluate on the test set after every epoch (for the logs and curves).")
flags.DEFINE_string("output", None, "Results JSON; the models' weights go to the same folder. Default "
                    "runs/<method>_<network>_<dataset>[-<setting>=<value>...]/results.json, named after the settings "
                    "that differ from the method's defaults. A results.json of another configuration is never "
                    "overwritten.")
flags.DEFINE_string("backup_dir", None, "Checkpoint after every epoch here; a restarted run resumes from it.")
# --log_dir is absl.logging's flag (absl writes log files there only when asked to, which this script never does);
# here it names the folder of the CSV log (log.csv) and the TensorBoard events, default <output folder>/logs.
flags.DEFINE_bool("tensorboard", True, "Write TensorBoard events to --log_dir.")
flags.DEFINE_string("save_model", None, "Also save model 0 as a .keras file here (e.g. a teacher for cultivate).")

FLAGS = flags.FLAGS


def config_from_flags():
    """The experiment the flags describe (not yet checked: see experiment.resolve)."""
    values = {field: FLAGS[field].value for field in experiment.Config.__dataclass_fields__}
    values["log_dir"] = values["log_dir"] or None  # absl's default is "".
    return experiment.Config(**values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.cpu_devices:
        import tensorflow as tf

        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(FLAGS.cpu_devices)])
    try:  # Bad settings fail before training: contradictions here, bad values in the library.
        results = experiment.run(config_from_flags())
    except (ValueError, FileNotFoundError) as e:
        raise experiment.ScriptError("train.py", str(e)) from e
    table = experiment.format_table([results], [results["method"]])
    print(f"\n{results['description']}\n\n{table}\n", flush=True)
    if results["weights"]:
        print(f"Results: {results['results']}\nWeights: {', '.join(results['weights'])}"
              + (f"\nModel 0: {results['saved_model']}" if results["saved_model"] else "")
              + (f"\nLog: {results['log_csv']}" if results["log_csv"] else ""), flush=True)
    logging.info("Done in %.1f s of training.", results["fit_seconds"])


if __name__ == "__main__":
    app.run(main)
