"""Grafting and FilterStats in model.fit, end to end."""

import contextlib
import csv
import io
import math
import os
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import keras_graft
from keras_graft import criteria
from keras_graft import peers as peers_lib

from test_criteria import np_entropy
from test_grafting import np_alpha, small_net


def printed(function):
    """(result, stdout lines) of ``function()`` with absl logging at WARNING: printing must not need logging."""
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level  # NOTSET (inherit) unless set: restore exactly that
    absl_logger.setLevel("WARNING")
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            result = function()
    finally:
        absl_logger.setLevel(level)
    return result, output.getvalue().splitlines()


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype(np.float32), np.arange(n) % 3


class Snapshot(keras.callbacks.Callback):
    """Records the model's weights at each epoch's begin and end (placed after Grafting: after its round)."""

    def __init__(self):
        super().__init__()
        self.begin, self.end = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin.append([w.numpy() for w in self.model.weights])

    def on_epoch_end(self, epoch, logs=None):
        self.end.append([w.numpy() for w in self.model.weights])


def compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class StopAfter(keras.callbacks.Callback):
    """Interrupts fit after epoch ``epoch`` has ended (and been backed up), as a kill would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class GraftingCallbackTest(tf.test.TestCase):

    def grafted_head(self, own, peer):
        alpha = np_alpha(np_entropy(own), np_entropy(peer))
        return alpha, alpha * own + (1 - alpha) * peer

    def test_round_after_each_epoch_opens_the_next(self):
        model, peer = compiled(small_net(1)), small_net(2)
        snapshot = Snapshot()
        csv_path = os.path.join(self.get_temp_dir(), "log.csv")
        history = model.fit(*data(), batch_size=8, epochs=3, verbose=0,
                            callbacks=[keras_graft.Grafting(peers=[peer]), snapshot,
                                       keras.callbacks.CSVLogger(csv_path)])
        theirs = peer.get_layer("head").kernel.numpy()
        head = [w.path for w in model.weights].index("head/kernel")
        for epoch in (1, 2):  # The round after epoch e - 1 runs as epoch e begins, on the weights it ended with.
            _, grafted = self.grafted_head(snapshot.end[epoch - 1][head], theirs)
            self.assertAllClose(snapshot.begin[epoch][head], grafted, rtol=1e-5)
        # No round after the final epoch: fit returns the weights its last epoch validated and logged.
        self.assertAllEqual(model.get_layer("head").kernel.numpy(), snapshot.end[2][head])
        self.assertEqual(history.history["graft_alpha"][0], 1.0)  # No round opened the first epoch.
        self.assertNotIn(1.0, history.history["graft_alpha"][1:])
        self.assertEqual(history.history["graft_layers"], [0, 3, 3])
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        self.assertAllClose([float(r["graft_alpha"]) for r in rows], history.history["graft_alpha"])
        # The headline keys: neutral (0) in the first epoch, measured in the others, in every CSV row.
        for key in ("graft_alpha_spread", "graft_peer_distance"):
            self.assertEqual(history.history[key][0], 0.0)
            self.assertTrue(all(value > 0 for value in history.history[key][1:]), key)
            self.assertAllClose([float(r[key]) for r in rows], history.history[key])
        # The distance before the round opening epoch e is the one between the weights epoch e - 1 ended with
        # and the (fixed) peer, over the trainable weights.
        trainable = [i for i, w in enumerate(model.weights) if w.trainable]
        theirs = peer.get_weights()
        for epoch in (1, 2):
            own = snapshot.end[epoch - 1]
            expected = np.sqrt(sum(np.sum((own[i] - theirs[i]) ** 2) for i in trainable)
                               / sum(np.sum(own[i] ** 2) for i in trainable))
            self.assertAllClose(history.history["graft_peer_distance"][epoch], expected, rtol=1e-5)

    def test_final_graft_keeps_the_old_behaviour(self):
        model, peer = compiled(small_net(1)), small_net(2)
        snapshot = Snapshot()
        model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                  callbacks=[keras_graft.Grafting(peer, final_graft=True), snapshot])
        head = [w.path for w in model.weights].index("head/kernel")
        _, grafted = self.grafted_head(snapshot.end[1][head], peer.get_layer("head").kernel.numpy())
        self.assertAllClose(model.get_layer("head").kernel.numpy(), grafted, rtol=1e-5)

    def test_last_logged_validation_is_what_fit_returns(self):
        model, peer = compiled(small_net(1)), small_net(2)
        x, y = data()
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y),
                            callbacks=[keras_graft.Grafting(peer)])
        loss, accuracy = model.evaluate(x, y, verbose=0)
        self.assertAllClose(history.history["val_loss"][-1], loss, rtol=1e-5)
        self.assertAllClose(history.history["val_accuracy"][-1], accuracy)

    def test_resume_grafts_the_pending_round_once(self):
        x, y = data()
        backup = os.path.join(self.get_temp_dir(), "backup")

        def run(epochs, stop_after=None):
            keras.utils.set_random_seed(3)
            model, peer = compiled(small_net(1)), small_net(2)
            callbacks = [keras_graft.Grafting(peer), keras.callbacks.BackupAndRestore(backup)]
            if stop_after is not None:
                callbacks.append(StopAfter(stop_after))
            model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)
            return model

        uninterrupted = [w.numpy() for w in run(3).weights]
        with self.assertRaises(KeyboardInterrupt):
            run(3, stop_after=1)
        resumed = [w.numpy() for w in run(3).weights]
        for a, b in zip(uninterrupted, resumed):
            self.assertAllClose(a, b, rtol=1e-6, atol=1e-7)

    def test_every_n_epochs(self):
        model, peer = compiled(small_net(1)), small_net(2)
        history = model.fit(*data(), batch_size=8, epochs=4, verbose=0,
                            callbacks=[keras_graft.Grafting(peer, every_n_epochs=2)])
        # The round after epoch 2 opens epoch 3; none follows epoch 4, the last.
        self.assertEqual(history.history["graft_layers"], [0, 0, 3, 0])

    def test_bad_input_before_training(self):
        model = compiled(small_net(1))
        before = model.get_weights()
        with self.assertRaisesRegex(ValueError, "does not match"):
            model.fit(*data(), epochs=1, verbose=0, callbacks=[keras_graft.Grafting([small_net(2, (4, 6))])])
        for old, now in zip(before, model.get_weights()):
            self.assertAllEqual(old, now)
        for kwargs, message in [({"a": -0.1}, "a must lie"), ({"c": -5}, "c must be"), ({"level": "x"}, "level"),
                                ({"criterion": "x"}, "Unknown criterion"), ({"every_n_epochs": 0}, "every_n_epochs"),
                                ({"criterion": criteria.Entropy(bins=3), "a": 2}, "a must lie")]:
            with self.assertRaisesRegex(ValueError, message):
                keras_graft.Grafting([small_net(2)], **kwargs)
        with self.assertRaisesRegex(ValueError, "cannot graft itself"):
            model.fit(*data(), epochs=1, verbose=0, callbacks=[keras_graft.Grafting([model])])
        with self.assertRaisesRegex(ValueError, "has no peers"):
            model.fit(*data(), epochs=1, verbose=0, callbacks=[keras_graft.Grafting()])
        with self.assertRaisesRegex(TypeError, "peers must be a Keras model, a list of models or a PeerSource, "
                                               "got 'model'"):
            keras_graft.Grafting("model")
        with self.assertRaisesRegex(TypeError, "got peer 1 = 3"):
            keras_graft.Grafting([small_net(2), 3])

    def test_bad_types_name_the_argument(self):
        peer = small_net(2)
        for kwargs, error, message in [
                ({"a": "0.4"}, TypeError, "a must be a number, got '0.4'"),
                ({"c": [500]}, TypeError, r"c must be a number, got \[500\]"),
                ({"a": float("nan")}, ValueError, "a must be a finite number, got nan"),
                ({"every_n_epochs": "2"}, TypeError, "every_n_epochs must be an integer, got '2'"),
                ({"every_n_epochs": 1.5}, ValueError, "every_n_epochs must be an integer >= 1, got 1.5"),
                ({"final_graft": "yes"}, TypeError, "final_graft must be True or False, got 'yes'"),
                ({"verbose": 2}, ValueError, "verbose must be 0 or 1, got 2"),
                ({"verbose": "1"}, TypeError, "verbose must be 0 or 1, got '1'"),
                ({"layers": 3}, TypeError, "layers must be None, a layer name, a list of layer names or a "
                                           "callable.*got 3"),
                ({"model": "student"}, TypeError, "model must be None or the Keras model to graft, got a str"),
                ({"level": 1}, ValueError, "Unknown grafting level 1")]:
            with self.assertRaisesRegex(error, message):
                keras_graft.Grafting(peer, **kwargs)

    def test_verbose_prints_one_line_per_round(self):
        model, peer = compiled(small_net(1)), small_net(2)
        callback = keras_graft.Grafting(peer, verbose=1)
        history, lines = printed(lambda: model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[callback]))
        lines = [line for line in lines if line.startswith("Grafting")]
        self.assertLen(lines, 2)  # rounds after epochs 1 and 2
        self.assertEqual(lines[1], f"Grafting '{model.name}', round after epoch 2: alpha "
                                   f"{history.history['graft_alpha'][2]:.3f}, |alpha - 0.5| "
                                   f"{history.history['graft_alpha_spread'][2]:.3f}, peer distance "
                                   f"{history.history['graft_peer_distance'][2]:.3f}, 3 layers")
        _, quiet = printed(lambda: compiled(small_net(3)).fit(*data(), batch_size=8, epochs=2, verbose=0,
                                                              callbacks=[keras_graft.Grafting(peer)]))
        self.assertEqual(quiet, [])

    def test_several_peers_average_alpha_spread_and_distance(self):
        logs = keras_graft.rounds.merge_logs([keras_graft.GraftResult(["a"], [0.4], [False], [0.1], 0.2),
                                                  keras_graft.GraftResult(["a"], [0.7], [False], [0.2], 0.4)])
        self.assertAllClose([logs["graft_alpha"], logs["graft_alpha_spread"], logs["graft_peer_distance"]],
                            [0.55, 0.15, 0.3])
        self.assertEqual((logs["graft_layers"], logs["graft_skipped_layers"]), (2, 0))
        model = compiled(small_net(1))
        history = model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                            callbacks=[keras_graft.Grafting([small_net(2), small_net(3)])])
        self.assertEqual(history.history["graft_layers"], [0, 6])
        self.assertGreater(history.history["graft_peer_distance"][1], 0.0)

    def test_get_config(self):
        callback = keras_graft.Grafting([small_net(2)], criterion="l1", a=0.3, c=100, level="filter",
                                        every_n_epochs=3, layers=["conv1"])
        config = callback.get_config()
        self.assertEqual(config["criterion"], {"class_name": "L1Norm", "config": {}})
        self.assertEqual((config["a"], config["c"], config["level"], config["every_n_epochs"], config["layers"]),
                         (0.3, 100.0, "filter", 3, ["conv1"]))
        clone = keras_graft.Grafting.from_config(config)
        self.assertEqual(clone.get_config(), config)
        self.assertIsInstance(clone.criterion, criteria.L1Norm)
        stats = keras_graft.FilterStats(thresholds=[0.1, 0.01], bins=7, include_dense=True)
        self.assertEqual(keras_graft.FilterStats.from_config(stats.get_config()).get_config(), stats.get_config())

    def test_static_peer_is_named_in_a_warning(self):
        model, peer = compiled(small_net(1)), small_net(2, name="donor_net")
        with self.assertLogs(level="WARNING") as logs:
            model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[keras_graft.Grafting(peer)])
        static = [line for line in logs.output if "donor_net" in line]
        self.assertLen(static, 1)  # once, at the first round
        self.assertIn("it is not training", static[0])
        self.assertIn("warn_static=False", static[0])

    def test_training_peer_or_warn_static_false_is_silent(self):
        model, peer = compiled(small_net(1)), small_net(2)
        train_peer = keras.callbacks.LambdaCallback(  # as if something trained the peer every epoch
            on_epoch_end=lambda epoch, logs: peer.get_layer("head").bias.assign_add(np.full((3,), 1e-3, np.float32)))
        for callbacks in ([keras_graft.Grafting(peer), train_peer], [keras_graft.Grafting(peer, warn_static=False)]):
            with mock.patch.object(peers_lib.logging, "warning") as warning:
                model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=callbacks)
            self.assertFalse([c for c in warning.call_args_list if "not training" in c.args[0]])
        self.assertFalse(keras_graft.Grafting(peer, warn_static=False).get_config()["warn_static"])

    def test_nan_peer_is_counted_in_logs(self):
        model, peer = compiled(small_net(1)), small_net(2)
        peer.get_layer("head").bias.assign(np.full((3,), np.nan, np.float32))
        history = model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[keras_graft.Grafting(peer)])
        self.assertEqual(history.history["graft_skipped_layers"], [0, 1])
        self.assertTrue(all(np.isfinite(w).all() for w in model.get_weights()))


class FilterStatsTest(tf.test.TestCase):

    def test_bad_arguments_name_the_argument(self):
        for kwargs, error, message in [
                ({"thresholds": "x"}, TypeError, "thresholds must be a number or a list of numbers, got 'x'"),
                ({"thresholds": float("nan")}, ValueError, "thresholds must be finite numbers >= 0, got nan"),
                ({"thresholds": [0.1, float("inf")]}, ValueError, r"thresholds must be finite.*\[0.1, inf\]"),
                ({"thresholds": []}, ValueError, "thresholds must hold at least one number"),
                ({"thresholds": [0.1, None]}, TypeError, "thresholds must be a number or a list"),
                ({"bins": 1}, ValueError, "bins must be an integer >= 2, got 1"),
                ({"include_dense": "yes"}, TypeError, "include_dense must be True or False, got 'yes'"),
                ({"models": "model"}, TypeError, "models must be None or a list of Keras models, got 'model'"),
                ({"verbose": 3}, ValueError, "verbose must be 0 or 1, got 3")]:
            with self.assertRaisesRegex(error, message):
                keras_graft.FilterStats(**kwargs)
        self.assertEqual(keras_graft.FilterStats(np.array([0.1, 0.01])).thresholds, (0.1, 0.01))

    def test_dense_only_model_fails_before_any_step_and_suggests_include_dense(self):
        model = compiled(keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                                           keras.layers.Dense(3, name="out")]))
        x, y = np.ones((16, 4), np.float32), np.arange(16) % 3
        before = model.get_weights()
        with self.assertRaisesRegex(ValueError, r"no convolution layers.*Dense layers \(hidden, out\).*"
                                                r"FilterStats\(include_dense=True\)"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[keras_graft.FilterStats()])
        for old, now in zip(before, model.get_weights()):
            self.assertAllEqual(old, now)  # no step ran
        history = model.fit(x, y, epochs=1, verbose=0, callbacks=[keras_graft.FilterStats(include_dense=True)])
        self.assertEqual(history.history["invalid_filters"], [0])

    def test_non_finite_weights_give_nan(self):
        model = small_net(1)
        kernel = model.get_layer("conv2").kernel
        kernel.assign(np.where(np.arange(kernel.numpy().size).reshape(kernel.shape) == 0, np.inf,
                               kernel.numpy()).astype(np.float32))
        stats = keras_graft.FilterStats(thresholds=[0.1, 0.01]).measure(model)
        self.assertEqual(sorted(stats), ["invalid_filter_ratio_0.01", "invalid_filter_ratio_0.1",
                                         "invalid_filters_0.01", "invalid_filters_0.1", "mean_entropy"])
        self.assertTrue(all(math.isnan(value) for value in stats.values()), stats)

    def test_verbose_prints_one_line_per_epoch(self):
        model = compiled(small_net(1))
        history, lines = printed(lambda: model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                                                   callbacks=[keras_graft.FilterStats(verbose=1)]))
        lines = [line for line in lines if "FilterStats" in line]
        self.assertEqual(lines, [f"Epoch {e + 1}: FilterStats: invalid_filters {history.history['invalid_filters'][e]},"
                                 f" invalid_filter_ratio {history.history['invalid_filter_ratio'][e]:.4g}, "
                                 f"mean_entropy {history.history['mean_entropy'][e]:.4g}" for e in range(2)])

    def test_logs_invalid_filters_and_entropy(self):
        model = compiled(small_net(1))
        history = model.fit(*data(), batch_size=8, epochs=1, verbose=0,
                            callbacks=[keras_graft.FilterStats(thresholds=[0.1, 30.0])])
        kernels = [model.get_layer(n).kernel.numpy() for n in ("conv1", "conv2")]
        norms = np.concatenate([np.abs(k).reshape(-1, k.shape[-1]).sum(0) for k in kernels])
        self.assertEqual(history.history["invalid_filters_30"], [int((norms < 30.0).sum())])
        self.assertEqual(history.history["invalid_filters_0.1"], [int((norms < 0.1).sum())])
        self.assertAllClose(history.history["invalid_filter_ratio_30"], [(norms < 30.0).mean()])
        self.assertAllClose(history.history["mean_entropy"], [np.mean([np_entropy(k) for k in kernels])],
                            rtol=1e-5)

    def test_single_threshold_keys_and_zeroed_filters(self):
        model = small_net(1)
        kernel = model.get_layer("conv2").kernel
        kernel.assign(kernel.numpy() * np.array([0, 1, 0, 1, 1], np.float32))
        stats = keras_graft.FilterStats().measure(model)
        self.assertEqual(stats["invalid_filters"], 2)
        self.assertAlmostEqual(stats["invalid_filter_ratio"], 2 / 9)
        self.assertEqual(keras_graft.FilterStats().get_config()["thresholds"], [0.1])
        with self.assertRaisesRegex(ValueError, "thresholds"):
            keras_graft.FilterStats(thresholds=-1)
        dense_only = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, "no convolution layers"):
            keras_graft.FilterStats().measure(dense_only)


if __name__ == "__main__":
    tf.test.main()
