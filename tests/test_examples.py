"""End-to-end tests of the example scripts: examples/train.py (every method), plot_filters.py and quickstart.py.

Every run is tiny (ResNet-8 of width 2, 64 Fashion-MNIST images, one epoch of two steps). train.py runs in this
process through its main() with parsed flags (one TensorFlow start for all methods); the scripts whose flags would
collide with train.py's (plot_filters.py, quickstart.py) and the runs that need their own process (a
MirroredStrategy over two logical CPUs, the exit status of a bad command line) run as subprocesses.
"""

import dataclasses
import importlib.util
import json
import os
import re
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
        # Two epochs: the round after epoch 1 opens epoch 2; none follows the last epoch.
        cls.graft = _run_train(*_TINY, "--method=graft", "--lr_spread", "--schedule=cosine", "--epochs=2",
                               f"--output={cls.dir}/graft/results.json")

    def out(self, name):
        return f"--output={self.dir}/{name}/results.json"

    def check_results(self, results, method, num_models, epochs=1):
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
        self.assertEqual(results["epochs_run"], epochs)
        self.assertIn("val_accuracy", results["history"])
        self.assertTrue(os.path.isfile(results["log_csv"]))

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

    def test_plot_filters_labels_runs_by_configuration(self):
        png = os.path.join(self.dir, "filters_labels.png")
        weights = [self.baseline["weights"][0], *self.graft["weights"]]
        result = _script("plot_filters.py", f"--weights={','.join(weights)}", f"--output={png}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("baseline epochs=1: resnet8_w2, 30 filters", result.stdout)
        self.assertIn("graft epochs=2 schedule=cosine model 0: resnet8_w2", result.stdout)
        self.assertIn("graft epochs=2 schedule=cosine model 1: resnet8_w2", result.stdout)

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
        ("unknown_model", dict(model="resnet_big"), "Unknown --model='resnet_big'; available: convnet3, mobilenetv2, resnet110"),
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
        ("reference_not_graft", dict(method="cultivate", protocol="reference"), "use --method=graft"),
        ("reference_contradicted", dict(method="graft", protocol="reference", schedule="cosine"),
         "--protocol=reference sets --schedule='step'; got --schedule='cosine'"),
        ("reference_no_spread", dict(method="graft", protocol="reference", lr_spread=False), "--lr_spread"),
        ("unknown_protocol", dict(protocol="paper"), "Unknown --protocol"),
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
        # The reference's --difflr: the learning-rate spread is on where networks graft each other.
        self.assertTrue(cfg.lr_spread)
        self.assertTrue(_common.resolve(_common.Config(method="cultivate", teacher=__file__ + ".keras"),
                                        check_files=False).lr_spread)
        for method in ("baseline", "ensemble", "mutual"):
            self.assertFalse(_common.resolve(_common.Config(method=method)).lr_spread)
        self.assertFalse(_common.resolve(_common.Config(method="graft", lr_spread=False)).lr_spread)
        reference = _common.resolve(_common.Config(method="graft", protocol="reference", epochs=200))
        self.assertEqual(_common.run_settings(reference), {**_common.run_settings(cfg), "protocol": "reference"})
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


class RunIdentityTest(tf.test.TestCase):
    """Output folders named after the settings, no silent overwrite, warnings, messages, labels (no training)."""

    def test_output_folder_is_named_after_every_setting_that_changes_the_run(self):
        self.assertEqual(_common.resolve(_common.Config(method="graft")).output,
                         os.path.join("runs", "graft_resnet32_cifar10", "results.json"))
        variations = [dict(), dict(width=8), dict(depth=20), dict(epochs=2), dict(graft_every=3), dict(lr_spread=False),
                      dict(seed=1), dict(lr=0.05), dict(a=0.3), dict(level="filter"), dict(train_subset=1000),
                      dict(test_subset=500), dict(val_subset=200), dict(validate=False), dict(strategy="mirrored"),
                      dict(num_models=3), dict(schedule="cosine"), dict(source="noise", num_models=1),
                      dict(source="noise", num_models=1, threshold=0.05), dict(dataset="fashion_mnist_local"),
                      dict(image_size=32, dataset="fashion_mnist_local"), dict(steps_per_epoch=10)]
        names = [_common.resolve(_common.Config(method="graft", **v)).output for v in variations]
        self.assertLen(set(names), len(names))
        self.assertIn("-epochs=2-", _common.resolve(_common.Config(method="graft", epochs=2, graft_every=3)).output)
        # Where files go does not change the run, so it does not change the name.
        for location in (dict(tensorboard=False), dict(backup_dir="/tmp/b"), dict(data_dir="/data")):
            self.assertEqual(_common.run_name(_common.resolve(_common.Config(method="graft", **location))),
                             "graft_resnet32_cifar10")
        # Two teachers of the same file name in different folders: two folders.
        teachers = []
        for folder in ("a", "b"):
            path = os.path.join(self.get_temp_dir(), folder, "teacher.keras")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
            teachers.append(_common.resolve(_common.Config(method="cultivate", teacher=path)).output)
        self.assertNotEqual(teachers[0], teachers[1])
        long = _common.resolve(_common.Config(method="repr", **{f: 3 for f in ("repr_s1", "repr_s2", "repr_cycles",
                                                                                 "epochs", "lr_step_epochs", "seed",
                                                                                 "train_subset", "test_subset",
                                                                                 "val_subset", "steps_per_epoch")},
                                              repr_ratio=0.25, lr=0.05, momentum=0.5, weight_decay=1e-4))
        self.assertLessEqual(len(os.path.dirname(long.output)), len("runs/") + 150)

    def _results_of(self, cfg):
        _common.write_json(cfg.output, {"config": cfg.to_dict()})

    def test_refuses_to_overwrite_another_configuration(self):
        output = os.path.join(self.get_temp_dir(), "run", "results.json")
        old = _common.resolve(_common.Config(method="graft", epochs=2, output=output))
        self._results_of(old)
        _common.check_output(old)  # The same configuration again (a resumed run) may write there.
        _common.check_output(dataclasses.replace(old, tensorboard=False, backup_dir="/tmp/x"))
        new = _common.resolve(_common.Config(method="graft", epochs=3, graft_every=2, output=output))
        expected = (r"holds a run of another configuration(.|\n)*there: graft: 2 models(.|\n)*2 epochs(.|\n)*"
                    r"here:  graft: 2 models(.|\n)*every 2 epochs(.|\n)*3 epochs(.|\n)*"
                    r"--epochs=2 there, 3 here, --graft_every=1 there, 2 here")
        with self.assertRaisesRegex(_common.ConfigError, expected):
            _common.check_output(new)
        with mock.patch.object(_common.GraftTrainer, "__init__", side_effect=AssertionError("built a trainer")):
            with self.assertRaisesRegex(_common.ConfigError, "another configuration"):
                _common.run(new)
        with open(output, "w") as f:
            f.write("not json")
        with self.assertRaisesRegex(_common.ConfigError, "is not the results of a train.py run"):
            _common.check_output(new)

    def test_warns_when_no_graft_will_happen(self):
        def warnings(**settings):
            return _common.run_warnings(_common.resolve(_common.Config(**settings)))

        self.assertEqual(warnings(method="graft", graft_every=2, epochs=3), [])
        (message,) = warnings(method="graft", graft_every=3, epochs=2)
        self.assertIn("--graft_every=3 with --epochs=2: no graft will happen", message)
        self.assertIn("--epochs=4 or more", message)
        self.assertLen(warnings(method="graft", epochs=1), 1)  # no round follows the final epoch
        self.assertIn("no scion will be grafted", warnings(method="graft", source="noise", graft_every=3,
                                                           epochs=2)[0])
        self.assertEqual(warnings(method="graft", source="noise", graft_every=2, epochs=2), [])
        self.assertIn("RePr will drop no filter", warnings(method="repr", repr_s1=5, epochs=5)[0])
        self.assertEqual(warnings(method="baseline", epochs=1), [])
        for epochs, every, rounds in ((4, 1, 3), (4, 2, 1), (5, 2, 2), (1, 1, 0)):
            cfg = _common.resolve(_common.Config(method="graft", epochs=epochs, graft_every=every))
            self.assertEqual(_common.graft_rounds(cfg), rounds)

    @unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files are not installed")
    def test_run_logs_the_warning_before_training(self):
        output = os.path.join(self.get_temp_dir(), "warned", "results.json")
        cfg = _common.Config(method="graft", dataset="fashion_mnist_local", model="resnet8", width=2, epochs=2,
                             graft_every=3, train_subset=64, batch_size=32, output=output)
        with mock.patch.object(_common.GraftTrainer, "fit", side_effect=AssertionError("training started")):
            with self.assertLogs(level="WARNING") as logs:
                with self.assertRaisesRegex(AssertionError, "training started"):
                    _common.run(cfg)
        self.assertTrue(any("no graft will happen" in line for line in logs.output), logs.output)

    def test_missing_data_message_names_flags_train_py_has(self):
        empty = tempfile.mkdtemp(dir=self.get_temp_dir())
        cfg = _common.Config(dataset="cifar10", data_dir=empty, model="resnet8", width=2, epochs=1,
                             output=os.path.join(empty, "out", "results.json"))
        with mock.patch.object(_common.GraftTrainer, "fit", side_effect=AssertionError("training started")):
            with self.assertRaises(_common.ConfigError) as raised:
                _common.run(cfg)
        message = str(raised.exception)
        self.assertIn("pass --data_dir=DIR", message)
        self.assertNotIn("download=True", message)
        for flag in re.findall(r"(?<![\w-])--(\w+)", message):
            self.assertIn(flag, FLAGS, f"the message names --{flag}, a flag train.py lacks: {message}")

    def test_run_labels_tell_runs_apart_by_configuration(self):
        runs = [_common.resolve(_common.Config(**s)) for s in (dict(method="baseline"),
                                                               dict(method="graft", lr_spread=False),
                                                               dict(method="graft", graft_every=3),
                                                               dict(method="graft", width=8))]
        self.assertEqual(_common.run_labels(runs), ["baseline resnet32", "graft resnet32 no_lr_spread",
                                                    "graft resnet32 graft_every=3", "graft resnet32_w8"])
        self.assertEqual(_common.run_labels([runs[0].to_dict(), runs[1].to_dict()]), ["baseline",
                                                                                      "graft"])

    def test_epoch_line_headline_is_spread_and_distance(self):
        lines = []
        logger = _common.EpochLogger(lines.append, epochs=3, num_models=2, val_images=2000)
        logger.on_epoch_begin(1)
        logger.on_epoch_end(1, {"loss": 1.0, "val_accuracy_0": 0.5, "val_accuracy_1": 0.6, "graft_alpha": 0.5,
                                "graft_alpha_spread": 0.0573, "graft_peer_distance": 0.2468, "graft_layers": 20})
        logger.on_epoch_begin(0)
        logger.on_epoch_end(0, {"loss": 1.0, "graft_alpha": 1.0, "graft_alpha_spread": 0.0,
                                "graft_peer_distance": 0.0, "graft_layers": 0})
        self.assertIn("graft |a-0.5| 0.057 peer dist 0.247", lines[0])
        self.assertIn("test acc (first 2000 imgs) 0.5000 0.6000", lines[0])
        self.assertNotIn("alpha 0.5", lines[0])
        self.assertIn("no graft", lines[1])


if __name__ == "__main__":
    tf.test.main()
