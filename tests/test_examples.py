"""End-to-end tests of the example scripts: examples/train.py (every method), plot_filters.py and quickstart.py.

Every run is tiny (ResNet-8 of width 2, 64 Fashion-MNIST images, one epoch of two steps). train.py runs in this
process through its main() with parsed flags (one TensorFlow start for all methods); the scripts whose flags would
collide with train.py's (plot_filters.py, quickstart.py) and the runs that need their own process (a
MirroredStrategy over two logical CPUs, the exit status of a bad command line) run as subprocesses.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import keras
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXAMPLES = os.path.join(_ROOT, "examples")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, _EXAMPLES)
import _common  # noqa: E402


def _load_train_module():
    spec = importlib.util.spec_from_file_location("keras_graft_examples_train", os.path.join(_EXAMPLES, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train_module()
FLAGS = flags.FLAGS

_TINY = ["--dataset=fashion_mnist_local", "--model=resnet8", "--width=2", "--epochs=1", "--batch_size=32",
         "--train_subset=64", "--test_subset=64", "--tensorboard=false"]


def _data_available():
    try:
        _common.datasets.load("fashion_mnist_local", "test", batch_size=8, subset=8)
        return True
    except _common.datasets.DatasetUnavailableError:
        return False


_DATA = _data_available()


def _run_train(*args):
    """Runs train.py's main with these flags in this process; returns the results JSON."""
    with flagsaver.flagsaver():
        argv = FLAGS(["train.py", *args])
        train.main(argv)
        output = FLAGS.output
    keras.backend.clear_session()
    with open(output) as f:
        return json.load(f)


def _script(name, *args, timeout=240, env=None):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(_EXAMPLES, name), *args], cwd=_ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def _check_png(testcase, path):
    testcase.assertTrue(os.path.isfile(path), path)
    with open(path, "rb") as f:
        head = f.read(8)
    testcase.assertEqual(head, _PNG_SIGNATURE)
    testcase.assertGreater(os.path.getsize(path), 10_000)


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class TrainScriptTest(tf.test.TestCase, parameterized.TestCase):
    """examples/train.py end to end for every method, and the plot script on its weights."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(prefix="keras_graft_examples_")
        cls.teacher = os.path.join(cls.dir, "teacher.keras")
        cls.baseline = _run_train(*_TINY, "--method=baseline", f"--output={cls.dir}/baseline/results.json",
                                  f"--save_model={cls.teacher}")
        cls.graft = _run_train(*_TINY, "--method=graft", "--lr_spread", "--schedule=cosine",
                               f"--output={cls.dir}/graft/results.json")

    def out(self, name):
        return f"--output={self.dir}/{name}/results.json"

    def check_results(self, results, method, num_models):
        for key in ("method", "model", "dataset", "num_models", "config", "model_spec", "test_accuracy",
                    "test_loss", "ensemble_accuracy", "mean_accuracy", "invalid_filters", "invalid_filters_per_layer",
                    "filters_per_model", "weights", "history", "log_csv", "fit_seconds", "epochs_run"):
            self.assertIn(key, results)
        self.assertEqual(results["method"], method)
        self.assertEqual(results["num_models"], num_models)
        self.assertEqual(results["model"], "resnet8_w2")
        self.assertLen(results["test_accuracy"], num_models)
        for accuracy in results["test_accuracy"] + [results["ensemble_accuracy"]]:
            self.assertBetween(accuracy, 0.0, 1.0)
        self.assertEqual(sorted(results["invalid_filters"]), ["0.01", "0.1"])
        for counts in results["invalid_filters"].values():
            self.assertLen(counts, num_models)
            self.assertTrue(all(0 <= c <= results["filters_per_model"] for c in counts))
        self.assertEqual(results["filters_per_model"], 2 + 2 * 2 + 2 * 4 + 2 * 8)  # stem + 3 stages of 1 block.
        self.assertLen(results["weights"], num_models)
        for k, path in enumerate(results["weights"]):
            self.assertEqual(os.path.basename(path), f"model_{k}.weights.h5")
            self.assertTrue(os.path.isfile(path))
        self.assertEqual(results["epochs_run"], 1)
        self.assertIn("val_accuracy", results["history"])
        self.assertTrue(os.path.isfile(results["log_csv"]))

    def test_baseline(self):
        self.check_results(self.baseline, "baseline", 1)
        self.assertTrue(os.path.isfile(self.teacher))
        teacher = keras.saving.load_model(self.teacher, compile=False)
        self.assertEqual(tuple(teacher.outputs[0].shape), (None, 10))

    def test_graft(self):
        self.check_results(self.graft, "graft", 2)
        self.assertIn("graft_alpha", self.graft["history"])
        self.assertEqual(self.graft["config"]["criterion"], "entropy")
        # Two models end every graft with the same weights (their coefficients add up to 1).
        self.assertAllClose(self.graft["test_accuracy"][0], self.graft["test_accuracy"][1])

    @parameterized.named_parameters(
        ("ensemble", ["--method=ensemble"], "ensemble", 2),
        ("noise", ["--method=graft", "--source=noise", "--threshold=100"], "graft", 1),
        ("internal", ["--method=graft", "--source=internal", "--num_models=2"], "graft", 2),
        # 3 steps: the drop comes before step 1, the re-initialisation before step 2.
        ("repr", ["--method=repr", "--repr_unit=step", "--repr_s1=1", "--repr_s2=1", "--repr_cycles=1",
                  "--train_subset=96"], "repr", 1),
    )
    def test_method(self, args, method, num_models):
        results = _run_train(*_TINY, *args, self.out(self._testMethodName))
        self.check_results(results, method, num_models)
        if "--source=noise" in args:
            self.assertEqual(results["history"]["scion_filters"], [results["filters_per_model"]])
        if method == "repr":
            self.assertEqual([e["event"] for e in results["repr_events"]], ["drop", "reinit"])
        if method == "ensemble":
            self.assertNotIn("graft_alpha", results["history"])

    def test_cultivate(self):
        results = _run_train(*_TINY, "--method=cultivate", f"--teacher={self.teacher}", self.out("cultivate"))
        self.check_results(results, "cultivate", 2)
        self.assertEqual(results["config"]["teacher"], self.teacher)

    def test_mutual(self):
        results = _run_train(*_TINY, "--method=mutual", self.out("mutual"))
        self.check_results(results, "mutual", 2)

    def test_plot_filters(self):
        png = os.path.join(self.dir, "filters.png")
        result = _script("plot_filters.py", f"--weights={self.baseline['weights'][0]},{self.graft['weights'][0]}",
                         "--labels=baseline,graft", f"--output={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _check_png(self, png)
        self.assertIn("baseline: resnet8_w2, 30 filters", result.stdout)

    def test_plot_filters_with_model_flags_and_logs(self):
        png = os.path.join(self.dir, "filters_flags.png")
        weights = self.graft["weights"]
        # A weights file without results.json next to it: the architecture comes from the flags.
        lonely = os.path.join(self.dir, "lonely", "w.weights.h5")
        os.makedirs(os.path.dirname(lonely))
        with open(weights[1], "rb") as src, open(lonely, "wb") as dst:
            dst.write(src.read())
        result = _script("plot_filters.py", f"--weights={weights[0]},{lonely}", "--model=resnet8", "--width=2",
                         "--dataset=fashion_mnist_local", f"--logs={self.graft['log_csv']}", f"--output={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _check_png(self, png)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):
    """Bad or contradictory settings fail with a message before any training."""

    @parameterized.named_parameters(
        ("unknown_model", dict(model="resnet_big"), "Unknown --model='resnet_big'; available: mobilenetv2, resnet110"),
        ("unknown_dataset", dict(dataset="mnist"), "Unknown --dataset='mnist'; valid datasets: cifar10, cifar100"),
        ("resnet_depth", dict(model="resnet21"), "Unsupported CIFAR ResNet depth 21: the depth must be 6n \\+ 2"),
        ("depth_flag", dict(model="resnet20", depth=10), "Unsupported CIFAR ResNet depth 10"),
        ("depth_not_resnet", dict(model="vgg16_bn", depth=11), "--depth apply to the ResNet family"),
        ("baseline_models", dict(method="baseline", num_models=3), "--method=baseline trains one model"),
        ("graft_one_model", dict(method="graft", num_models=1), "--method=graft with --num_models=1"),
        ("ensemble_one_model", dict(method="ensemble", num_models=1), "an ensemble needs models"),
        ("mutual_one_model", dict(method="mutual", num_models=1), "mutual learning needs peers"),
        ("graft_flags_baseline", dict(method="baseline", a=0.3, criterion="l1"), "--criterion, --a set grafting"),
        ("repr_flags_graft", dict(method="graft", repr_s1=3), "--repr_s1 only apply to --method=repr"),
        ("teacher_not_cultivate", dict(method="graft", teacher="t.keras"), "--teacher is only used by "
                                                                           "--method=cultivate"),
        ("temperature_baseline", dict(temperature=3.0), "--temperature only apply to --method=cultivate or "
                                                        "--method=mutual"),
        ("cultivate_without_teacher", dict(method="cultivate"), "--method=cultivate distils from a teacher"),
        ("missing_teacher", dict(method="cultivate", teacher="/nonexistent/teacher.keras"),
         "Teacher file '/nonexistent/teacher.keras' not found"),
        ("teacher_not_keras", dict(method="cultivate", teacher="/tmp/teacher.h5"), "must be a Keras model file"),
        ("scion_flags_external", dict(method="graft", threshold=0.05), "--threshold set the scion"),
        ("mixing_flags_noise", dict(method="graft", source="noise", a=0.2), "--a set how peer networks mix"),
        ("sigma_internal", dict(method="graft", source="internal", sigma_decay=0.5), "--sigma_decay is for "
                                                                                      "--source=noise"),
        ("lr_spread_one_model", dict(method="baseline", lr_spread=True), "--lr_spread spreads"),
        ("bad_a", dict(method="graft", a=2.0), "--a must lie in \\[0, 1\\]"),
        ("bad_save_model", dict(save_model="model.h5"), "--save_model must end in .keras"),
        ("bad_epochs", dict(epochs=0), "--epochs must be a positive integer"),
        ("step_epochs_cosine", dict(schedule="cosine", lr_step_epochs=30), "--lr_step_epochs is for --schedule=step"),
    )
    def test_resolve(self, settings, message):
        with self.assertRaisesRegex(_common.ConfigError, message):
            _common.resolve(_common.Config(**settings))

    def test_defaults_are_the_papers_protocol(self):
        cfg = _common.resolve(_common.Config(method="graft"))
        self.assertEqual((cfg.model, cfg.dataset, cfg.num_models, cfg.epochs, cfg.batch_size), ("resnet32", "cifar10",
                                                                                                 2, 200, 128))
        self.assertEqual((cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.lr_step_epochs),
                         (0.1, 0.9, 5e-4, "step", 60))
        self.assertEqual((cfg.criterion, cfg.level, cfg.a, cfg.c, cfg.source), ("entropy", "layer", 0.4, 500.0,
                                                                                 "external"))
        self.assertEqual(_common.resolve(_common.Config(method="graft", source="noise")).num_models, 1)
        self.assertEqual(_common.resolve(_common.Config(method="graft", level="filter")).criterion, "bn_scale")
        spec = _common.model_spec(_common.resolve(_common.Config(model="resnet8", width=4)))
        self.assertEqual((spec.depth, spec.width, spec.label), (8, 4, "resnet8_w4"))

    def test_resolve_is_idempotent(self):
        for settings in (dict(method="graft"), dict(method="graft", source="noise"), dict(method="graft",
                         source="internal", num_models=2), dict(method="repr"), dict(method="ensemble", lr_spread=True),
                         dict(method="graft", level="filter", a=0.2)):
            once = _common.resolve(_common.Config(**settings))
            self.assertEqual(_common.resolve(once), once)

    def _run_without_training(self, **settings):
        with mock.patch.object(_common.GraftTrainer, "fit", side_effect=AssertionError("training started")):
            _common.run(_common.Config(**settings))

    @unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files are not installed")
    def test_errors_found_by_run_come_before_training(self):
        tiny = dict(dataset="fashion_mnist_local", model="resnet8", width=2, epochs=1, train_subset=64,
                    batch_size=32, output=os.path.join(self.get_temp_dir(), "r", "results.json"))
        with self.assertRaisesRegex(_common.ConfigError, "--steps_per_epoch=5 but 64 training examples in batches "
                                                         "of 32 give 2 steps"):
            self._run_without_training(steps_per_epoch=5, **tiny)
        with self.assertRaisesRegex(_common.ConfigError, "Cannot build 1 x --model=vgg16_bn for fashion_mnist_local "
                                                         "inputs of shape \\(28, 28, 1\\)"):
            self._run_without_training(**dict(tiny, model="vgg16_bn", width=None))
        with self.assertRaisesRegex(_common.ConfigError, "not found in /nonexistent"):
            self._run_without_training(**dict(tiny, data_dir="/nonexistent"))
        teacher = os.path.join(self.get_temp_dir(), "wrong_teacher.keras")
        keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]).save(teacher)
        with self.assertRaisesRegex(_common.ConfigError, "takes inputs of shape \\(32, 32, 3\\)"):
            self._run_without_training(method="cultivate", teacher=teacher, **tiny)

    def test_flags_reach_the_checks(self):
        with flagsaver.flagsaver():
            argv = FLAGS(["train.py", "--method=baseline", "--num_models=3"])
            with self.assertRaisesRegex(SystemExit, "--method=baseline trains one model"):
                train.main(argv)

    def test_command_line_error_exits_before_training(self):
        result = _script("train.py", "--method=graft", "--num_models=1", "--dataset=fashion_mnist_local",
                         "--output=/nonexistent/never/results.json")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--method=graft with --num_models=1: grafting between networks", result.stderr)
        self.assertNotIn("epoch 1/", result.stderr + result.stdout)
        self.assertNotIn("Traceback", result.stderr)


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class ScriptProcessTest(tf.test.TestCase):
    """The scripts as a user runs them, each in its own process."""

    def test_train_graft_mirrored_two_replicas(self):
        out = os.path.join(self.get_temp_dir(), "mirrored", "results.json")
        result = _script("train.py", *_TINY, "--method=graft", "--strategy=mirrored", "--cpu_devices=2",
                         f"--output={out}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertRegex(result.stdout, r"graft +ensemble")
        self.assertIn("2 replica(s)", result.stderr)
        with open(out) as f:
            results = json.load(f)
        self.assertLen(results["test_accuracy"], 2)

    def test_quickstart_tiny(self):
        out = os.path.join(self.get_temp_dir(), "quickstart")
        result = _script("quickstart.py", "--tiny", f"--output_dir={out}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("baseline  model 0", result.stdout)
        self.assertIn("graft     ensemble", result.stdout)
        self.assertIn("epoch 1/1", result.stdout)
        _check_png(self, os.path.join(out, "filters.png"))
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f)
        self.assertEqual(results["dataset"], "fashion_mnist_local")
        self.assertEqual(results["baseline"]["num_models"], 1)
        self.assertEqual(results["graft"]["num_models"], 2)
        self.assertTrue(results["graft"]["config"]["lr_spread"])
        self.assertEqual(results["graft"]["config"]["schedule"], "cosine")


if __name__ == "__main__":
    tf.test.main()
