"""keras_graft.experiment: resolving settings, run folders, the library's errors before training, callbacks, files.

Runs that train use ResNet-8 of width 2 on random 8x8 images (EpochRecord) or 64 Fashion-MNIST images
(run); the scripts built on this API are tested end to end in test_examples.py.
"""

import json
import os
import tempfile
import unittest
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_graft
from keras_graft import datasets
from keras_graft import experiment
from keras_graft.experiment import Config
from keras_graft.experiment import resolve

import testing_utils


_DATA = testing_utils.fashion_mnist_available()
_TINY = dict(dataset="fashion_mnist_local", model="resnet8", width=2, epochs=1, train_subset=64, test_subset=64,
             batch_size=32, tensorboard=False)


def _tiny_model():
    return keras_graft.models.get("convnet3", filters=4, input_shape=(8, 8, 3))


def _random_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype("float32"), rng.integers(0, 10, size=n)


class ResolveTest(tf.test.TestCase, parameterized.TestCase):
    """Defaults of each method and settings that contradict each other (no TensorFlow op)."""

    @parameterized.named_parameters(
        ("unknown_method", dict(method="distil"), "Unknown --method='distil'; valid: baseline"),
        ("unknown_protocol", dict(protocol="paper"), "Unknown --protocol"),
        ("unknown_source", dict(method="graft", source="peer"), "Unknown --source='peer'"),
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
        ("scion_flags_external", dict(method="graft", threshold=0.05), "--threshold set the scion"),
        ("mixing_flags_noise", dict(method="graft", source="noise", a=0.2), "--a set how peer networks mix"),
        ("sigma_internal", dict(method="graft", source="internal", sigma_decay=0.5), "--sigma_decay is for "
                                                                                      "--source=noise"),
        ("lr_spread_one_model", dict(method="baseline", lr_spread=True), "--lr_spread spreads"),
        ("bad_save_model", dict(save_model="model.h5"), "--save_model must end in .keras"),
        ("step_epochs_cosine", dict(schedule="cosine", lr_step_epochs=30), "--lr_step_epochs is for --schedule=step"),
        ("reference_not_graft", dict(method="cultivate", protocol="reference"), "use --method=graft"),
        ("reference_contradicted", dict(method="graft", protocol="reference", schedule="cosine"),
         "--protocol=reference sets --schedule='step'; got --schedule='cosine'"),
        ("reference_no_spread", dict(method="graft", protocol="reference", lr_spread=False), "--lr_spread"),
    )
    def test_contradictions(self, settings, message):
        with self.assertRaisesRegex(experiment.ConfigError, message):
            resolve(Config(**settings))

    def test_values_are_left_to_the_library(self):
        # resolve checks no value that the library checks: these fail in run(), with the library's messages.
        for settings in (dict(method="graft", a=2.0), dict(model="resnet21"), dict(epochs=0),
                         dict(method="repr", repr_ratio=1.5), dict(dataset="mnist")):
            resolve(Config(**settings))

    def test_defaults_are_the_papers_protocol(self):
        cfg = resolve(Config(method="graft"))
        self.assertEqual((cfg.model, cfg.dataset, cfg.num_models, cfg.epochs, cfg.batch_size),
                         ("resnet32", "cifar10", 2, 200, 128))
        self.assertEqual((cfg.lr, cfg.momentum, cfg.weight_decay, cfg.schedule, cfg.lr_step_epochs),
                         (0.1, 0.9, 5e-4, "step", 60))
        self.assertEqual((cfg.criterion, cfg.level, cfg.a, cfg.c, cfg.source), ("entropy", "layer", 0.4, 500.0,
                                                                                 "external"))
        self.assertEqual(resolve(Config(method="graft", source="noise")).num_models, 1)
        # The reference's --difflr: the learning-rate spread is on where networks graft each other.
        self.assertTrue(cfg.lr_spread)
        self.assertTrue(resolve(Config(method="cultivate", teacher="t.keras")).lr_spread)
        for method in ("baseline", "ensemble", "mutual"):
            self.assertFalse(resolve(Config(method=method)).lr_spread)
        self.assertFalse(resolve(Config(method="graft", lr_spread=False)).lr_spread)
        reference = resolve(Config(method="graft", protocol="reference", epochs=200))
        self.assertEqual(experiment.run_settings(reference), {**experiment.run_settings(cfg), "protocol": "reference"})
        self.assertEqual(resolve(Config(method="graft", level="filter")).criterion, "bn_scale")
        repr_cfg = resolve(Config(method="repr"))
        self.assertEqual((repr_cfg.repr_s1, repr_cfg.repr_s2, repr_cfg.repr_cycles, repr_cfg.repr_ratio,
                          repr_cfg.repr_unit), (20, 10, 3, 0.3, "epoch"))
        self.assertEqual(resolve(Config(method="mutual")).temperature, 2.0)

    def test_resolve_is_idempotent(self):
        for settings in (dict(method="graft"), dict(method="graft", source="noise"),
                         dict(method="graft", source="internal", num_models=2), dict(method="repr"),
                         dict(method="ensemble", lr_spread=True), dict(method="graft", level="filter", a=0.2)):
            once = resolve(Config(**settings))
            self.assertEqual(resolve(once), once)

    def test_config_round_trips_through_a_dict(self):
        cfg = resolve(Config(method="graft", width=8))
        self.assertEqual(Config.from_dict({**cfg.to_dict(), "depth": 20}), cfg)  # Unknown (old) fields dropped.


class RunIdentityTest(tf.test.TestCase):
    """Output folders named after the settings, no silent overwrite, warnings, labels (no training)."""

    def test_output_folder_is_named_after_every_setting_that_changes_the_run(self):
        self.assertEqual(resolve(Config(method="graft")).output,
                         os.path.join("runs", "graft_resnet32_cifar10", "results.json"))
        self.assertEqual(experiment.run_name(resolve(Config(method="graft", model="resnet20", width=8, epochs=2,
                                                            graft_every=3, dataset="fashion_mnist_local"))),
                         "graft_resnet20_w8_fashion_mnist_local-epochs=2-graft_every=3")
        variations = [dict(), dict(width=8), dict(model="resnet20"), dict(epochs=2), dict(graft_every=3),
                      dict(lr_spread=False), dict(seed=1), dict(lr=0.05), dict(a=0.3), dict(level="filter"),
                      dict(train_subset=1000), dict(test_subset=500), dict(val_subset=200), dict(validate=False),
                      dict(strategy="mirrored"), dict(num_models=3), dict(schedule="cosine"),
                      dict(source="noise", num_models=1), dict(source="noise", num_models=1, threshold=0.05),
                      dict(dataset="fashion_mnist_local"), dict(image_size=32, dataset="fashion_mnist_local"),
                      dict(steps_per_epoch=10)]
        names = [resolve(Config(method="graft", **v)).output for v in variations]
        self.assertLen(set(names), len(names))
        # Where files go does not change the run, so it does not change the name.
        for location in (dict(tensorboard=False), dict(backup_dir="/tmp/b"), dict(data_dir="/data")):
            self.assertEqual(experiment.run_name(resolve(Config(method="graft", **location))),
                             "graft_resnet32_cifar10")
        # Two teachers of the same file name in different folders: two folders.
        teachers = [resolve(Config(method="cultivate", teacher=os.path.join(folder, "teacher.keras"))).output
                    for folder in ("a", "b")]
        self.assertNotEqual(teachers[0], teachers[1])
        long = resolve(Config(method="repr", **{f: 3 for f in ("repr_s1", "repr_s2", "repr_cycles", "epochs",
                                                               "lr_step_epochs", "seed", "train_subset",
                                                               "test_subset", "val_subset", "steps_per_epoch")},
                              repr_ratio=0.25, lr=0.05, momentum=0.5, weight_decay=1e-4))
        self.assertLessEqual(len(os.path.dirname(long.output)), len("runs/") + 150)

    def test_refuses_to_overwrite_another_configuration(self):
        output = os.path.join(self.get_temp_dir(), "run", "results.json")
        old = resolve(Config(method="graft", epochs=2, output=output))
        experiment.write_json(old.output, {"config": old.to_dict()})
        experiment.check_output(old)  # The same configuration again (a resumed run) may write there.
        experiment.check_output(resolve(Config(method="graft", epochs=2, output=output, tensorboard=False)))
        new = resolve(Config(method="graft", epochs=3, graft_every=2, output=output))
        expected = (r"holds a run of another configuration(.|\n)*there: graft: 2 models(.|\n)*2 epochs(.|\n)*"
                    r"here:  graft: 2 models(.|\n)*every 2 epochs(.|\n)*3 epochs(.|\n)*"
                    r"--epochs=2 there, 3 here, --graft_every=1 there, 2 here")
        with self.assertRaisesRegex(experiment.ConfigError, expected):
            experiment.check_output(new)
        with mock.patch.object(keras_graft.GraftTrainer, "__init__", side_effect=AssertionError("built a trainer")):
            with self.assertRaisesRegex(experiment.ConfigError, "another configuration"):
                experiment.run(new)
        with open(output, "w") as f:
            f.write("not json")
        with self.assertRaisesRegex(experiment.ConfigError, "is not the results of a train.py run"):
            experiment.check_output(new)

    def test_warns_when_no_graft_will_happen(self):
        def warnings(**settings):
            return experiment.run_warnings(resolve(Config(**settings)))

        self.assertEqual(warnings(method="graft", graft_every=2, epochs=3), [])
        (message,) = warnings(method="graft", graft_every=3, epochs=2)
        self.assertIn("--graft_every=3 with --epochs=2: no graft will happen", message)
        self.assertIn("--epochs=4 or more", message)
        self.assertLen(warnings(method="graft", epochs=1), 1)  # No round follows the final epoch.
        self.assertIn("no scion will be grafted", warnings(method="graft", source="noise", graft_every=3,
                                                           epochs=2)[0])
        self.assertLen(warnings(method="graft", source="noise", graft_every=2, epochs=2), 1)  # Scions: same timing.
        self.assertEqual(warnings(method="graft", source="noise", graft_every=2, epochs=3), [])
        self.assertIn("RePr will drop no filter", warnings(method="repr", repr_s1=5, epochs=5)[0])
        self.assertEqual(warnings(method="baseline", epochs=1), [])
        for epochs, every, rounds in ((4, 1, 3), (4, 2, 1), (5, 2, 2), (1, 1, 0)):
            self.assertEqual(experiment.graft_rounds(resolve(Config(method="graft", epochs=epochs,
                                                                    graft_every=every))), rounds)

    def test_run_labels_tell_runs_apart_by_configuration(self):
        runs = [resolve(Config(**s)) for s in (dict(method="baseline"), dict(method="graft", lr_spread=False),
                                               dict(method="graft", graft_every=3), dict(method="graft", width=8))]
        self.assertEqual(experiment.run_labels(runs), ["baseline resnet32", "graft resnet32 no_lr_spread",
                                                       "graft resnet32 graft_every=3", "graft resnet32_w8"])
        self.assertEqual(experiment.run_labels([runs[0].to_dict(), runs[1].to_dict()]), ["baseline", "graft"])


class ModelSpecTest(tf.test.TestCase):

    def test_builds_named_and_patterned_networks_through_models_get(self):
        spec = experiment.model_spec(Config(model="resnet8", width=2, weight_decay=0.0),
                                     datasets.info("fashion_mnist_local"))
        self.assertEqual((spec.label, spec.input_shape, spec.num_classes), ("resnet8_w2", (28, 28, 1), 10))
        model = experiment.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).build()
        self.assertEqual(tuple(model.input_shape), (None, 28, 28, 1))
        self.assertEqual(keras_graft.criteria.invalid_filters(model, 0.1).total, 2 + 2 * 2 + 2 * 4 + 2 * 8)
        self.assertEqual(experiment.ModelSpec("resnet20").label, "resnet20")
        leaky = experiment.ModelSpec("resnet14_leaky", width=2, input_shape=(8, 8, 3)).build()
        self.assertEqual(leaky.get_layer("stem_act").__class__.__name__, "LeakyReLU")
        wrn = keras_graft.models.get("wrn10_1", input_shape=(8, 8, 3))
        self.assertEqual(wrn.get_layer("stem_conv").filters, 16)
        with self.assertRaisesRegex(ValueError, "Unknown model 'resnet_big'; available: .*resnet<6n\\+2>"):
            keras_graft.models.get("resnet_big")
        with self.assertRaisesRegex(ValueError, "CIFAR ResNet depth must be 6n \\+ 2"):
            keras_graft.models.get("resnet21")

    def test_from_label_inverts_label_and_builds_what_the_builder_builds(self):
        for label, (name, width) in (("resnet8_w8", ("resnet8", 8)), ("wrn28_10", ("wrn28_10", None)),
                                     ("resnet20", ("resnet20", None)), ("resnet14_leaky_w4", ("resnet14_leaky", 4))):
            spec = experiment.ModelSpec.from_label(label, input_shape=(28, 28, 1))
            self.assertEqual((spec.name, spec.width, spec.label), (name, width, label))
        keras.utils.set_random_seed(3)
        built = experiment.ModelSpec.from_label("resnet8_w4", input_shape=(28, 28, 1), weight_decay=5e-4).build()
        keras.utils.set_random_seed(3)
        direct = keras_graft.models.cifar_resnet(8, width=4, num_classes=10, input_shape=(28, 28, 1),
                                                 weight_decay=5e-4)
        self.assertEqual([w.path for w in built.weights], [w.path for w in direct.weights])
        for a, b in zip(built.weights, direct.weights):
            self.assertAllEqual(a.numpy(), b.numpy())
        self.assertAllClose(sum(built.losses), sum(direct.losses))


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class RunTest(tf.test.TestCase, parameterized.TestCase):
    """run() builds the library's objects: their errors come through, before the first training step."""

    def _run_without_training(self, **settings):
        settings = {**_TINY, "output": os.path.join(self.get_temp_dir(), "r", "results.json"), **settings}
        with mock.patch.object(keras_graft.GraftTrainer, "fit", side_effect=AssertionError("training started")):
            experiment.run(Config(**settings), log=lambda line: None)

    @parameterized.named_parameters(
        ("unknown_model", dict(model="resnet_big"), ValueError, "Unknown model 'resnet_big'"),
        ("resnet_depth", dict(model="resnet21"), ValueError, "CIFAR ResNet depth must be 6n \\+ 2"),
        ("unknown_dataset", dict(dataset="mnist"), ValueError, "mnist"),
        ("bad_a", dict(method="graft", a=2.0), ValueError, "Grafting coefficient a must lie in \\[0, 1\\]"),
        ("bad_threshold", dict(method="graft", source="noise", threshold=-1.0), ValueError, "threshold"),
        ("bad_repr_ratio", dict(method="repr", repr_ratio=1.5), ValueError, "prune_ratio must lie in \\(0, 1\\)"),
        ("bad_temperature", dict(method="mutual", temperature=0.0), ValueError, "temperature"),
        ("missing_teacher", dict(method="cultivate", teacher="/nonexistent/teacher.keras"), Exception,
         "/nonexistent/teacher.keras"),
        ("steps_per_epoch", dict(steps_per_epoch=5), experiment.ConfigError,
         "--steps_per_epoch=5 but the training data give 2 batches of 32 per epoch"),
        ("missing_data", dict(data_dir="/nonexistent"), datasets.DatasetUnavailableError, "--data_dir=DIR"),
    )
    def test_errors_come_before_training(self, settings, error, message):
        with self.assertRaisesRegex(error, message):
            self._run_without_training(**settings)

    def test_teacher_of_the_wrong_shape(self):
        teacher = os.path.join(self.get_temp_dir(), "wrong_teacher.keras")
        keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)]).save(teacher)
        with self.assertRaisesRegex(ValueError, "takes inputs of shape"):
            self._run_without_training(method="cultivate", teacher=teacher)

    def test_logs_the_warning_before_training(self):
        with self.assertLogs(level="WARNING") as logs:
            with self.assertRaisesRegex(AssertionError, "training started"):
                self._run_without_training(method="graft", epochs=2, graft_every=3)
        self.assertTrue(any("no graft will happen" in line for line in logs.output), logs.output)

    def test_run_writes_results_weights_and_log(self):
        output = os.path.join(self.get_temp_dir(), "graft", "results.json")
        lines = []
        # RePr's ConvNet: the run's path, not the network, is under test (and it traces twice as fast as ResNet-8).
        results = experiment.run(Config(**{**_TINY, "epochs": 2, "model": "convnet3", "width": None},
                                        method="graft", output=output), log=lines.append)
        self.assertEqual(results["steps_per_epoch"], 2)  # 64 images in batches of 32.
        self.assertEqual(results["epochs_run"], 2)
        self.assertEqual(results["history"]["graft_layers"][0], 0)
        self.assertGreater(results["history"]["graft_layers"][1], 0)
        self.assertEqual(results["model_spec"]["name"], "convnet3")
        with open(output) as f:
            self.assertEqual(json.load(f)["test_accuracy"], results["test_accuracy"])
        for path in results["weights"] + [results["log_csv"]]:
            self.assertTrue(os.path.isfile(path), path)
        self.assertTrue(any(line.startswith("epoch 2/2") and "graft |a-0.5|" in line for line in lines), lines)
        table = experiment.format_table([results])
        self.assertRegex(table, r"graft +model 1")
        self.assertRegex(table, r"graft +ensemble")


class EpochLoggerTest(tf.test.TestCase):

    def test_epoch_line_headline_is_spread_and_distance(self):
        lines = []
        logger = experiment.EpochLogger(lines.append, epochs=3, num_models=2, val_images=2000)
        logger.on_epoch_begin(1)
        logger.on_epoch_end(1, {"loss": 1.0, "val_accuracy_0": 0.5, "val_accuracy_1": 0.6, "graft_alpha": 0.5,
                                "graft_alpha_spread": 0.0573, "graft_peer_distance": 0.2468, "graft_layers": 20})
        logger.on_epoch_begin(0)
        logger.on_epoch_end(0, {"loss": 1.0, "graft_alpha": 1.0, "graft_alpha_spread": 0.0,
                                "graft_peer_distance": 0.0, "graft_layers": 0, "invalid_filters_0.1_0": 3.0,
                                "invalid_filters_0.1_1": 0.0})
        self.assertIn("epoch 2/3", lines[0])
        self.assertIn("graft |a-0.5| 0.057 peer dist 0.247", lines[0])
        self.assertIn("test acc (first 2000 imgs) 0.5000 0.6000", lines[0])
        self.assertNotIn("alpha 0.5", lines[0])
        self.assertIn("no graft", lines[1])
        self.assertIn("invalid<0.1 3 0", lines[1])
        self.assertLen(logger.seconds, 2)


class CallbacksTest(tf.test.TestCase):
    """EpochRecord (the benchmarks' per-epoch rows) on a GraftTrainer."""

    def _trainer(self, num_models=2, grafting=True):
        return keras_graft.GraftTrainer(
            _tiny_model, num_models, optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
            grafting=keras_graft.Grafting() if grafting else None, seed=0)

    def test_epoch_record_rows_file_and_resume(self):
        trainer = self._trainer()
        path = os.path.join(self.get_temp_dir(), "epochs.json")
        record = experiment.EpochRecord(trainer, "test", path)
        trainer.fit(_random_data(), epochs=2, batch_size=16, validation_data=_random_data(16, seed=1),
                    callbacks=[record], verbose=0)
        self.assertLen(record.rows, 2)
        first, second = record.rows
        self.assertEqual(list(first), ["epoch", "seconds", "learning_rate", "train_loss", "test_accuracy",
                                       "test_accuracy_ensemble", "invalid_0.1", "invalid_0.01", "graft_alpha",
                                       "peer_distance"])
        self.assertEqual([first["epoch"], second["epoch"]], [1, 2])
        self.assertEqual(first["graft_alpha"], [1.0, 1.0])  # No round opened epoch 1.
        self.assertAllClose(sum(second["graft_alpha"]), 1.0, atol=1e-6)  # 2 models: alpha_1 = 1 - alpha_0.
        self.assertLen(first["test_accuracy"], 2)
        self.assertGreater(first["peer_distance"], 0.0)
        self.assertLess(second["peer_distance"], first["peer_distance"])  # The graft pulled the peers together.
        own, peer = (np.concatenate([w.ravel() for w in m.get_weights()]) for m in trainer.models)
        self.assertAllClose(second["peer_distance"], np.linalg.norm(own - peer) / np.linalg.norm(own), rtol=1e-5)
        with open(path) as f:
            self.assertEqual(json.load(f), record.rows)
        # A run resumed at epoch 1 (0-based) keeps the row of epoch 1 and reruns the others.
        resumed = experiment.EpochRecord(trainer, "test", path)
        self.assertEqual(resumed.rows, record.rows)
        resumed.on_epoch_begin(1)
        self.assertEqual([row["epoch"] for row in resumed.rows], [1])

    def test_epoch_record_probe_format(self):
        trainer = self._trainer(num_models=1, grafting=False)
        record = experiment.EpochRecord(trainer, "probe", accuracy_key="val_accuracy", peer_distance=False,
                                        thresholds=(0.1,))
        trainer.fit(_random_data(), epochs=1, batch_size=16, validation_data=_random_data(16, seed=1),
                    callbacks=[record], verbose=0)
        (row,) = record.rows
        self.assertEqual(list(row), ["epoch", "seconds", "learning_rate", "train_loss", "val_accuracy",
                                     "val_accuracy_ensemble", "invalid_0.1", "graft_alpha"])
        self.assertAllClose(row["learning_rate"], [0.05])


class FilesTest(tf.test.TestCase):

    def test_write_json_replaces_whole_files_and_converts_numpy(self):
        path = os.path.join(self.get_temp_dir(), "new", "results.json")
        experiment.write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": tf.constant([1, 2])})
        experiment.write_json(path, {"a": np.int64(2), "b": [1]})
        with open(path) as f:
            self.assertEqual(json.load(f), {"a": 2, "b": [1]})
        self.assertEqual(os.listdir(os.path.dirname(path)), ["results.json"])  # No temporary file left.

    def test_json_lines_round_trip_and_skip_a_cut_line(self):
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "sub", "runs.jsonl")
        self.assertEqual(experiment.read_jsonl(path), [])
        records = [{"method": "baseline", "per_epoch": [{"epoch": 1}]}, {"method": "graft2", "seed": 1}]
        for record in records:
            experiment.append_jsonl(path, record)
        with open(path) as f:
            self.assertEqual(f.read(), "".join(json.dumps(r) + "\n" for r in records))  # The benchmarks' format.
        with open(path, "a") as f:
            f.write('{"method": "cut sh')  # A writer killed mid-line.
        self.assertEqual(experiment.read_jsonl(path), records)


if __name__ == "__main__":
    tf.test.main()
