"""Criteria against independent NumPy computations, for every kernel layout."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from keras_graft import criteria, layouts


def np_entropy(values, bins=10):
    """Entropy of a histogram whose last bin is closed (numpy.histogram's convention)."""
    values = np.asarray(values, np.float64).ravel()
    counts, _ = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    p = counts[counts > 0] / values.size
    return float(-(p * np.log(p)).sum())


def np_filters(kernel, layer_kind):
    """The filters of a kernel, one flat array each, in output-channel order."""
    if layer_kind == "depthwise":  # (kh, kw, in, mult): output channel i * mult + m
        kh, kw, cin, mult = kernel.shape
        return [kernel[:, :, i, m].ravel() for i in range(cin) for m in range(mult)]
    if layer_kind == "transpose":  # (kh, kw, out, in)
        return [kernel[:, :, j, :].ravel() for j in range(kernel.shape[2])]
    return [kernel[..., j].ravel() for j in range(kernel.shape[-1])]


LAYERS = [
    ("conv1d", lambda: keras.layers.Conv1D(5, 3), (1, 9, 4), "standard"),
    ("conv2d", lambda: keras.layers.Conv2D(6, 3), (1, 8, 8, 3), "standard"),
    ("conv3d", lambda: keras.layers.Conv3D(4, 2), (1, 4, 4, 4, 2), "standard"),
    ("dense", lambda: keras.layers.Dense(7), (1, 5), "standard"),
    ("depthwise", lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (1, 8, 8, 3), "depthwise"),
    ("separable", lambda: keras.layers.SeparableConv2D(5, 3), (1, 8, 8, 3), "standard"),
    ("transpose", lambda: keras.layers.Conv2DTranspose(4, 3), (1, 6, 6, 3), "transpose"),
]


class EntropyTest(tf.test.TestCase, parameterized.TestCase):

    def test_layer_entropy_matches_numpy(self):
        values = np.random.default_rng(0).normal(size=(3, 3, 8, 16)).astype(np.float32)
        self.assertAllClose(criteria.entropy(values), np_entropy(values), atol=1e-5)

    def test_maximum_belongs_to_last_bin(self):
        # 0..9 plus 10: with half-open bins the maximum would be dropped (the reference code's behaviour).
        values = np.arange(11, dtype=np.float32)
        self.assertAllClose(criteria.entropy(values), np_entropy(values), atol=1e-6)
        counts = [1] * 9 + [2]
        p = np.array(counts) / 11.0
        self.assertAllClose(criteria.entropy(values), -(p * np.log(p)).sum(), atol=1e-6)

    def test_constant_tensor_has_zero_entropy(self):
        value = criteria.entropy(np.full((3, 3, 2, 4), 0.7, np.float32))
        self.assertEqual(float(value), 0.0)
        per_filter = criteria.entropy(np.zeros((3, 3, 2, 4), np.float32), per_filter=True)
        self.assertAllEqual(per_filter, np.zeros(4))

    def test_bins(self):
        values = np.random.default_rng(1).uniform(size=500).astype(np.float32)
        for bins in (2, 5, 32):
            self.assertAllClose(criteria.entropy(values, bins=bins), np_entropy(values, bins), atol=1e-5)
        with self.assertRaisesRegex(ValueError, "at least 2 bins"):
            criteria.entropy(values, bins=1)
        with self.assertRaisesRegex(ValueError, "bins >= 2"):
            criteria.Entropy(bins=1)
        with self.assertRaisesRegex(TypeError, "Entropy: bins must be an integer, got '10'"):
            criteria.Entropy(bins="10")

    def test_empty_tensor_is_a_clear_error(self):
        for per_filter, shape in ((False, (0,)), (False, (3, 3, 0, 4)), (True, (3, 3, 2, 0))):
            with self.assertRaisesRegex(ValueError, r"entropy of an empty tensor \(shape"):
                criteria.entropy(np.zeros(shape, np.float32), per_filter=per_filter)

    @parameterized.named_parameters(*[(name, build, shape, kind) for name, build, shape, kind in LAYERS])
    def test_per_filter_entropy_and_l1_for_every_layout(self, build, shape, kind):
        layer = build()
        layer(np.zeros(shape, np.float32))
        kernel, axes = layouts.primary_kernel(layer)
        rng = np.random.default_rng(2)
        kernel.assign(rng.normal(size=kernel.shape).astype(np.float32))
        filters = np_filters(kernel.numpy(), kind)
        self.assertAllClose(criteria.entropy(kernel, per_filter=True, filter_axes=axes),
                            [np_entropy(f) for f in filters], atol=1e-5)
        self.assertAllClose(criteria.l1_norm(kernel, filter_axes=axes), [np.abs(f).sum() for f in filters],
                            rtol=1e-5)
        self.assertAllClose(criteria.l1_norm(kernel, per_filter=False), np.abs(kernel.numpy()).sum(), rtol=1e-5)
        # Per-filter values line up with the layer's output channels.
        out_channels = layer.compute_output_shape(shape)[-1]
        self.assertLen(filters, out_channels)


class OtherCriteriaTest(tf.test.TestCase):

    def test_bn_scale(self):
        layer = keras.layers.BatchNormalization()
        layer.build((None, 4))
        layer.gamma.assign([-2.0, 0.5, 0.0, 3.0])
        self.assertAllClose(criteria.bn_scale(layer), [2.0, 0.5, 0.0, 3.0])
        no_scale = keras.layers.BatchNormalization(scale=False)
        no_scale.build((None, 4))
        with self.assertRaisesRegex(ValueError, "no scale"):
            criteria.bn_scale(no_scale)

    def test_orthogonality_matches_numpy(self):
        kernel = np.random.default_rng(3).normal(size=(3, 3, 4, 6)).astype(np.float32)
        rows = kernel.reshape(-1, 6).T
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        overlap = np.abs(rows @ rows.T - np.eye(6))
        self.assertAllClose(criteria.orthogonality(kernel), overlap.sum(axis=1) / 6, atol=1e-5)

    def test_criterion_objects(self):
        kernel = np.random.default_rng(4).normal(size=(3, 3, 2, 5)).astype(np.float32)
        self.assertAllClose(criteria.get("entropy")(kernel), np_entropy(kernel), atol=1e-5)
        l1 = criteria.get("l1")
        self.assertAllClose(l1(kernel), np.abs(kernel).reshape(-1, 5).sum(0).mean(), rtol=1e-5)
        self.assertAllClose(l1(kernel, per_filter=True), np.abs(kernel).reshape(-1, 5).sum(0), rtol=1e-5)


class IdentifierTest(tf.test.TestCase):

    def test_get_and_serialize_round_trip(self):
        for name in ("entropy", "l1", "bn_scale", "orthogonality"):
            criterion = criteria.get(name)
            self.assertEqual(criteria.get(criteria.serialize(criterion)), criterion)
        custom = criteria.Entropy(bins=16)
        self.assertEqual(custom.get_config(), {"bins": 16})
        self.assertEqual(criteria.deserialize(criteria.serialize(custom)).bins, 16)
        self.assertIs(criteria.get(custom), custom)

    def test_unknown_identifiers(self):
        with self.assertRaisesRegex(ValueError, "Unknown criterion 'variance'.*entropy"):
            criteria.get("variance")
        with self.assertRaisesRegex(ValueError, "Unknown criterion class"):
            criteria.get({"class_name": "Nope", "config": {}})
        with self.assertRaisesRegex(ValueError, "Could not interpret"):
            criteria.get(3)


class KerasSerializationTest(tf.test.TestCase):

    def test_criteria_round_trip_through_keras_serialization(self):
        for criterion in (criteria.Entropy(bins=7), criteria.L1Norm(), criteria.BNScale(), criteria.Orthogonality()):
            config = keras.saving.serialize_keras_object(criterion)
            self.assertEqual(config["registered_name"], f"keras_graft>{type(criterion).__name__}")
            self.assertEqual(keras.saving.deserialize_keras_object(config), criterion)


class InvalidFiltersTest(tf.test.TestCase):

    def test_counts_and_table(self):
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="first"),
            keras.layers.DepthwiseConv2D(3, name="depthwise"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="head"),
        ])
        first = model.get_layer("first").kernel
        values = np.ones(first.shape, np.float32)
        values[..., 1] = 0.0
        values[..., 3] = 0.001  # L1 = 27 * 0.001 = 0.027: invalid at 0.1, valid at 0.01
        first.assign(values)
        model.get_layer("depthwise").kernel.assign(np.full((3, 3, 4, 1), 0.5, np.float32))
        model.get_layer("depthwise").kernel[:, :, 2, 0].assign(np.zeros((3, 3), np.float32))
        report = criteria.invalid_filters(model, threshold=0.1)
        self.assertEqual(report.per_layer, [("first", 2, 4), ("depthwise", 1, 4)])
        self.assertEqual((report.invalid, report.total), (3, 8))
        self.assertAlmostEqual(report.ratio, 3 / 8)
        self.assertEqual(criteria.invalid_filters(model, threshold=0.01).invalid, 2)
        self.assertEqual(criteria.invalid_filters(model, 0.1, include_dense=True).total, 11)
        table = str(report)
        self.assertIn("first", table)
        self.assertIn("37.50%", table)
        self.assertEqual(report.to_dict()["per_layer"]["depthwise"], {"invalid": 1, "total": 4})
        with self.assertRaisesRegex(ValueError, "threshold"):
            criteria.invalid_filters(model, threshold=-1)


if __name__ == "__main__":
    tf.test.main()
