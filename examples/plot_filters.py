"""Compares the filters of two or more trained models (e.g. baseline vs grafted) in one PNG, as the papers' figures.

    python examples/plot_filters.py --output=runs/filters.png \\
        --weights=runs/baseline_resnet32_cifar10/model_0.weights.h5,runs/graft_resnet32_cifar10/model_0.weights.h5

Each model is labelled by its run's configuration (from the results.json next to its weights): the method, then
the settings in which the compared runs differ (``graft lr_spread``, ``graft graft_every=3``), then the model's
index for runs of several models; --labels overrides them.

Panels: the L1 norms of every convolution filter (histogram on a log scale, with the invalid thresholds 0.1 and
0.01), their distribution per model (violins, log scale, with each layer's smallest filter), the invalid filters
(L1 norm < --threshold) per layer, and, with --logs (or the CSV logs named in the runs' results JSON), the test
accuracy during training.

The architecture of each weights file comes from the results.json that examples/train.py writes next to it;
without one, give --model (and --width, --dataset/--image_size or --num_classes/--input_shape).
It also prints the invalid-filter counts per model.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from keras_graft import datasets  # noqa: E402
from keras_graft import experiment  # noqa: E402
from keras_graft.experiment import plots  # noqa: E402

flags.DEFINE_list("weights", None, "Comma-separated .weights.h5 files (model_<k>.weights.h5 of examples/train.py).")
flags.DEFINE_list("labels", None, "One label per weights file (default: from each run's results.json, the method "
                  "and the settings in which the runs differ, e.g. 'graft lr_spread', plus the model index of runs "
                  "with several models).")
flags.DEFINE_string("output", "filters.png", "PNG to write.")
flags.DEFINE_string("model", None, "Network of the weights (default: from the results.json next to each file).")
flags.DEFINE_integer("width", None, "Width override, as in train.py.")
flags.DEFINE_string("dataset", None, "Dataset the models were trained on (gives the input shape and classes).")
flags.DEFINE_integer("image_size", None, "Image size the models were trained with, as in train.py.")
flags.DEFINE_integer("num_classes", None, "Classes (instead of --dataset).")
flags.DEFINE_list("input_shape", None, "Input shape such as 32,32,3 (instead of --dataset).")
flags.DEFINE_list("logs", None, "CSV logs (log.csv of train.py) for accuracy curves; default: those named in the "
                  "runs' results.json; 'none' for no curves.")
flags.DEFINE_float("threshold", 0.1, "L1 norm below which a filter is invalid, for the per-layer bars.")
flags.DEFINE_string("title", None, "Figure title.")

FLAGS = flags.FLAGS


def _error(message):
    return experiment.ScriptError("plot_filters.py", message)


def _spec_for(path):
    """(ModelSpec, results dict or None) for one weights file."""
    results = plots.load_results_near(path)
    saved = experiment.ModelSpec.from_dict(results["model_spec"]) if results and "model_spec" in results else None
    if FLAGS.model is None:
        if saved is None:
            raise _error(f"No {experiment.RESULTS_FILE} next to {path} to read the architecture from: pass --model "
                         "(and --dataset or --num_classes/--input_shape).")
        return saved, results
    dsinfo = None if FLAGS.dataset is None else datasets.info(FLAGS.dataset, image_size=FLAGS.image_size)
    spec = experiment.model_spec(experiment.Config(model=FLAGS.model, width=FLAGS.width, weight_decay=0.0), dsinfo)
    if dsinfo is None and saved is not None:  # Classes and input shape from the run, architecture from the flags.
        spec = dataclasses.replace(spec, num_classes=saved.num_classes, input_shape=saved.input_shape)
    if FLAGS.num_classes:
        spec = dataclasses.replace(spec, num_classes=FLAGS.num_classes)
    if FLAGS.input_shape:
        spec = dataclasses.replace(spec, input_shape=tuple(int(v) for v in FLAGS.input_shape))
    return spec, results


def _run_labels(paths, results):
    """A label per weights file telling the runs apart by their configuration (method and the settings in
    which the runs differ, from each run's results.json); the run folder's name for files without one."""
    folders = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    known = [i for i, r in enumerate(results) if r and "config" in r]
    labels = list(folders)
    if known:
        try:
            for i, label in zip(known, experiment.run_labels([results[i]["config"] for i in known])):
                labels[i] = label
        except (TypeError, ValueError) as e:
            logging.warning("Cannot label the runs by their configuration (%s); using their folders.", e)
    return labels


def _model_label(path, run_label, results):
    """The run's label, with the model's index when the run trained several models."""
    several = results is None or results.get("num_models", 1) > 1
    return f"{run_label} {os.path.basename(path).split('.')[0].replace('_', ' ')}" if several else run_label


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    paths = FLAGS.weights or []
    if len(paths) < 1:
        raise _error("Pass --weights=a.weights.h5,b.weights.h5 (two or more models to compare).")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise _error(f"Weights file(s) not found: {', '.join(missing)}.")
    if FLAGS.labels and len(FLAGS.labels) != len(paths):
        raise _error(f"{len(FLAGS.labels)} labels for {len(paths)} weights files.")
    if not FLAGS.output.lower().endswith(".png"):
        raise _error(f"--output must be a .png file, got {FLAGS.output!r}.")

    try:
        specs = [_spec_for(path) for path in paths]
    except ValueError as e:
        raise _error(str(e)) from e
    run_labels = _run_labels(paths, [results for _, results in specs])
    labels = FLAGS.labels or [_model_label(path, label, results) for path, label, (_, results)
                              in zip(paths, run_labels, specs)]
    entries, logs = [], []
    for path, label, run_label, (spec, results) in zip(paths, labels, run_labels, specs):
        try:
            model = experiment.load_trained(path, spec)
        except ValueError as e:
            raise _error(f"Cannot load {path} into {spec.label} (input {tuple(spec.input_shape)}, {spec.num_classes} "
                         f"classes): {e}") from e
        norms = plots.filter_norms(model)
        entries.append((label, norms))
        counts = ", ".join(f"{sum(int((n < t).sum()) for _, n in norms)} below {t:g}" for t in experiment.THRESHOLDS)
        print(f"{label}: {spec.label}, {sum(n.size for _, n in norms)} filters; invalid: {counts}", flush=True)
        if FLAGS.logs is None and results and results.get("log_csv"):
            if results["log_csv"] not in [p for _, p in logs]:
                logs.append((run_label, results["log_csv"]))
    if FLAGS.logs and FLAGS.logs != ["none"]:
        missing = [p for p in FLAGS.logs if not os.path.isfile(p)]
        if missing:
            raise _error(f"Log file(s) not found: {', '.join(missing)}.")
        log_labels = labels if len(FLAGS.logs) == len(labels) else [
            os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(p)))) for p in FLAGS.logs]
        logs = list(zip(log_labels, FLAGS.logs))
    plots.plot_filters(entries, FLAGS.output, logs=logs, threshold=FLAGS.threshold, title=FLAGS.title)
    print(f"Wrote {FLAGS.output}", flush=True)
    logging.info("Compared %d models.", len(entries))


if __name__ == "__main__":
    app.run(main)
