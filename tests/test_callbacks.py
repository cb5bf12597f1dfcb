"""Grafting and FilterStats in model.fit, end to end."""

import csv
import os

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import criteria

from test_criteria import np_entropy
from test_grafting import np_alpha, small_net


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 3)).astype(np.float32), np.arange(n) % 3


class Snapshot(keras.callbacks.Callback):
    """Records the model's weights at each epoch end (placed before Grafting, so before the graft)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.numpy() for w in self.model.weights])


def compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class GraftingCallbackTest(tf.test.TestCase):

    def test_fit_grafts_peer_at_each_epoch_end(self):
        model, peer = compiled(small_net(1)), small_net(2)
        snapshot = Snapshot()
        csv_path = os.path.join(self.get_temp_dir(), "log.csv")
        history = model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                            callbacks=[snapshot, keras_graft.Grafting(peers=[peer]), keras.callbacks.CSVLogger(csv_path)])
        theirs = peer.get_layer("head").kernel.numpy()
        head = [w.path for w in model.weights].index("head/kernel")
        alphas = []
        for epoch in range(2):
            own = snapshot.weights[epoch][head]
            alpha = np_alpha(np_entropy(own), np_entropy(theirs))
            alphas.append(alpha)
            grafted = alpha * own + (1 - alpha) * theirs
            if epoch == 1:
                self.assertAllClose(model.get_layer("head").kernel.numpy(), grafted, rtol=1e-5)
        for key in ("graft_alpha", "graft_layers", "graft_skipped_layers", "loss", "accuracy"):
            self.assertLen(history.history[key], 2)
        self.assertEqual(history.history["graft_layers"], [3, 3])
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        self.assertIn("graft_alpha", rows[0])
        self.assertAllClose([float(r["graft_alpha"]) for r in rows], history.history["graft_alpha"])

    def test_every_n_epochs(self):
        model, peer = compiled(small_net(1)), small_net(2)
        history = model.fit(*data(), batch_size=8, epochs=4, verbose=0,
                            callbacks=[keras_graft.Grafting(peer, every_n_epochs=2)])
        # Keras History fills keys from the first epoch that reports them.
        self.assertLen(history.history["graft_alpha"], 2)

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
        with self.assertRaisesRegex(TypeError, "peers must be"):
            keras_graft.Grafting("model")

    def test_get_config(self):
        callback = keras_graft.Grafting([small_net(2)], criterion="l1", a=0.3, c=100, level="filter",
                                        every_n_epochs=3, layers=["conv1"])
        config = callback.get_config()
        self.assertEqual(config["criterion"], {"class_name": "L1Norm", "config": {}})
        self.assertEqual((config["a"], config["c"], config["level"], config["every_n_epochs"], config["layers"]),
                         (0.3, 100.0, "filter", 3, ["conv1"]))

    def test_nan_peer_is_counted_in_logs(self):
        model, peer = compiled(small_net(1)), small_net(2)
        peer.get_layer("head").bias.assign(np.full((3,), np.nan, np.float32))
        history = model.fit(*data(), batch_size=8, epochs=1, verbose=0, callbacks=[keras_graft.Grafting(peer)])
        self.assertEqual(history.history["graft_skipped_layers"], [1])
        self.assertTrue(all(np.isfinite(w).all() for w in model.get_weights()))


class FilterStatsTest(tf.test.TestCase):

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
