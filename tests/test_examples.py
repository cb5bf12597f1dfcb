"""End-to-end tests of the example scripts: examples/train.py (every method), plot_filters.py and quickstart.py.

The API they call, keras_graft.experiment, is tested in test_experiment.py.

Every run is tiny (RePr's 3-layer ConvNet, 64 Fashion-MNIST images, one epoch of two steps). train.py runs in this
process through its main() with parsed flags (one TensorFlow start for all methods); the scripts whose flags would
collide with train.py's (plot_filters.py, quickstart.py) and the runs that need their own process (a
MirroredStrategy over two logical CPUs) run in processes of their own (tests/processes.py), and a bad command
line in a new interpreter.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

import keras
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver
from absl.testing import parameterized


import processes
import testing_utils

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXAMPLES = os.path.join(_ROOT, "examples")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_train_module():
    spec = importlib.util.spec_from_file_location("keras_graft_examples_train", os.path.join(_EXAMPLES, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_train_module()
FLAGS = flags.FLAGS

# RePr's 3-layer ConvNet (32 filters per layer): these tests follow the scripts' paths, not the papers' networks
# (the quick start and the smoke study run ResNet-8), and it traces in half the time of ResNet-8.
_TINY = ["--dataset=fashion_mnist_local", "--model=convnet3", "--epochs=1", "--batch_size=32", "--train_subset=64",
         "--test_subset=64", "--tensorboard=false"]
_FILTERS = 3 * 32


_DATA = testing_utils.fashion_mnist_available()


def _run_train(*args):
    """Runs train.py's main with these flags in this process; returns the results JSON."""
    with flagsaver.flagsaver():
        argv = FLAGS(["train.py", *args])
        train.main(argv)
        output = FLAGS.output
    keras.backend.clear_session()
    with open(output) as f:
        return json.load(f)


def _script(name, *args, timeout=240):
    """Runs an example script in a process of its own (tests/processes.py)."""
    return processes.run(os.path.join(_EXAMPLES, name), args, cwd=_ROOT, timeout=timeout)


def _check_png(testcase, path):
    testcase.assertTrue(os.path.isfile(path), path)
    with open(path, "rb") as f:
        head = f.read(8)
    testcase.assertEqual(head, _PNG_SIGNATURE)
    testcase.assertGreater(os.path.getsize(path), 10_000)


class _TrainScriptChecks(tf.test.TestCase):
    """What every examples/train.py run's results JSON holds."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp(prefix="keras_graft_examples_")

    def out(self, name):
        return f"--output={self.dir}/{name}/results.json"

    def check_results(self, results, method, num_models, epochs=1):
        for key in ("method", "model", "dataset", "num_models", "config", "model_spec", "test_accuracy",
                    "test_loss", "ensemble_accuracy", "mean_accuracy", "invalid_filters", "invalid_filters_per_layer",
                    "filters_per_model", "weights", "history", "log_csv", "fit_seconds", "epochs_run"):
            self.assertIn(key, results)
        self.assertEqual(results["method"], method)
        self.assertEqual(results["num_models"], num_models)
        self.assertEqual(results["model"], "convnet3")
        self.assertLen(results["test_accuracy"], num_models)
        for accuracy in results["test_accuracy"] + [results["ensemble_accuracy"]]:
            self.assertBetween(accuracy, 0.0, 1.0)
        self.assertEqual(sorted(results["invalid_filters"]), ["0.01", "0.1"])
        for counts in results["invalid_filters"].values():
            self.assertLen(counts, num_models)
            self.assertTrue(all(0 <= c <= results["filters_per_model"] for c in counts))
        self.assertEqual(results["filters_per_model"], _FILTERS)
        self.assertLen(results["weights"], num_models)
        for k, path in enumerate(results["weights"]):
            self.assertEqual(os.path.basename(path), f"model_{k}.weights.h5")
            self.assertTrue(os.path.isfile(path))
        self.assertEqual(results["epochs_run"], epochs)
        self.assertIn("val_accuracy", results["history"])
        self.assertTrue(os.path.isfile(results["log_csv"]))



@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class TrainScriptTest(_TrainScriptChecks):
    """examples/train.py's baseline, graft and cultivate (from the baseline), and the plot script on their weights."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.teacher = os.path.join(cls.dir, "teacher.keras")
        cls.baseline = _run_train(*_TINY, "--method=baseline", f"--output={cls.dir}/baseline/results.json",
                                  f"--save_model={cls.teacher}")
        # Two epochs: the round after epoch 1 opens epoch 2; none follows the last epoch.
        cls.graft = _run_train(*_TINY, "--method=graft", "--lr_spread", "--schedule=cosine", "--epochs=2",
                               f"--output={cls.dir}/graft/results.json")

    def test_baseline(self):
        self.check_results(self.baseline, "baseline", 1)
        self.assertTrue(os.path.isfile(self.teacher))
        teacher = keras.saving.load_model(self.teacher, compile=False)
        self.assertEqual(tuple(teacher.outputs[0].shape), (None, 10))

    def test_graft(self):
        self.check_results(self.graft, "graft", 2, epochs=2)
        self.assertEqual(self.graft["history"]["graft_layers"][0], 0)
        self.assertGreater(self.graft["history"]["graft_layers"][1], 0)
        self.assertEqual(self.graft["config"]["criterion"], "entropy")

    def test_cultivate(self):
        results = _run_train(*_TINY, "--method=cultivate", f"--teacher={self.teacher}", self.out("cultivate"))
        self.check_results(results, "cultivate", 2)
        self.assertEqual(results["config"]["teacher"], self.teacher)

    def test_plot_filters(self):
        png = os.path.join(self.dir, "filters.png")
        result = _script("plot_filters.py", f"--weights={self.baseline['weights'][0]},{self.graft['weights'][0]}",
                         "--labels=baseline,graft", f"--output={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _check_png(self, png)
        self.assertIn(f"baseline: convnet3, {_FILTERS} filters", result.stdout)

    def test_plot_filters_labels_by_configuration_and_model_flags(self):
        png = os.path.join(self.dir, "filters_flags.png")
        # A weights file without results.json next to it: the architecture comes from the flags.
        lonely = os.path.join(self.dir, "lonely", "w.weights.h5")
        os.makedirs(os.path.dirname(lonely))
        with open(self.graft["weights"][1], "rb") as src, open(lonely, "wb") as dst:
            dst.write(src.read())
        weights = [self.baseline["weights"][0], self.graft["weights"][0], lonely]
        result = _script("plot_filters.py", f"--weights={','.join(weights)}", "--model=convnet3",
                         "--dataset=fashion_mnist_local", f"--logs={self.graft['log_csv']}", f"--output={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        _check_png(self, png)
        # Without --labels, a run is labelled by the settings that tell it apart, and a model by its index.
        self.assertIn(f"baseline epochs=1: convnet3, {_FILTERS} filters", result.stdout)
        self.assertIn("graft epochs=2 schedule=cosine model 0: convnet3", result.stdout)


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class TrainMethodsTest(_TrainScriptChecks, parameterized.TestCase):
    """examples/train.py end to end for the methods that need no other run."""

    @parameterized.named_parameters(
        ("ensemble", ["--method=ensemble"], "ensemble", 2),
        ("noise", ["--method=graft", "--source=noise", "--threshold=100", "--epochs=2"], "graft", 1),
        ("internal", ["--method=graft", "--source=internal", "--num_models=2"], "graft", 2),
        # 3 steps: the drop comes before step 1, the re-initialisation before step 2.
        ("repr", ["--method=repr", "--repr_unit=step", "--repr_s1=1", "--repr_s2=1", "--repr_cycles=1",
                  "--train_subset=96"], "repr", 1),
    )
    def test_method(self, args, method, num_models):
        results = _run_train(*_TINY, *args, self.out(self._testMethodName))
        self.check_results(results, method, num_models, epochs=2 if "--epochs=2" in args else 1)
        if "--source=noise" in args:
            # The round after epoch 1 opens epoch 2 (none after the final epoch); threshold 100: every filter.
            self.assertEqual(results["history"]["scion_filters"], [0, results["filters_per_model"]])
        if method == "repr":
            self.assertEqual([e["event"] for e in results["repr_events"]], ["drop", "reinit"])
        if method == "ensemble":
            self.assertNotIn("graft_alpha", results["history"])

    def test_mutual(self):
        results = _run_train(*_TINY, "--method=mutual", self.out("mutual"))
        self.check_results(results, "mutual", 2)


class CommandLineTest(tf.test.TestCase):
    """Bad command lines fail with one line before any training."""

    def test_flags_reach_the_checks(self):
        with flagsaver.flagsaver():
            argv = FLAGS(["train.py", "--method=baseline", "--num_models=3"])
            with self.assertRaisesRegex(SystemExit, "--method=baseline trains one model"):
                train.main(argv)

    def test_library_errors_reach_the_command_line(self):
        out = os.path.join(self.get_temp_dir(), "never", "results.json")
        for args, message in ((["--model=resnet21"], "CIFAR ResNet depth must be 6n \\+ 2"),
                              (["--method=graft", "--a=2"], "Grafting coefficient a must lie in \\[0, 1\\]")):
            with flagsaver.flagsaver():
                argv = FLAGS(["train.py", *_TINY, *args, f"--output={out}"])
                with self.assertRaisesRegex(SystemExit, "^train.py: error: " + message):
                    train.main(argv)
        self.assertFalse(os.path.exists(out))

    def test_command_line_error_exits_before_training(self):
        # The one run started as a user starts it: a new interpreter.
        result = subprocess.run([sys.executable, os.path.join(_EXAMPLES, "train.py"), "--method=graft",
                                 "--num_models=1", "--dataset=fashion_mnist_local",
                                 "--output=/nonexistent/never/results.json"], cwd=_ROOT, capture_output=True,
                                text=True, timeout=240, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
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


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class QuickstartScriptTest(tf.test.TestCase):
    """The README's first command, on a tiny configuration, in its own process."""

    def test_quickstart_tiny(self):
        out = os.path.join(self.get_temp_dir(), "quickstart")
        result = _script("quickstart.py", "--tiny", f"--output_dir={out}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("baseline  model 0", result.stdout)
        self.assertIn("graft     ensemble", result.stdout)
        self.assertIn("epoch 2/2", result.stdout)
        # Which test images each number uses, and the graft headline of the epoch its round opened.
        self.assertIn("its test accuracy uses the first 256 test images, the final table the first 512", result.stdout)
        self.assertIn("test acc (first 256 imgs)", result.stdout)
        self.assertRegex(result.stdout, r"epoch 2/2 .*graft \|a-0\.5\| [0-9.]+ peer dist [0-9.]+")
        self.assertNotIn("graft alpha", result.stdout)
        self.assertIn("Why the two grafted models", result.stdout)
        self.assertNotIn("tensorflow_datasets", result.stderr)
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
