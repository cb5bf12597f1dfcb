"""Filter layouts: rows against NumPy transposes, the registry, and a registered custom layer seen by criteria,
FilterStats, grafting, scions and RePr (each checked against NumPy)."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_graft
from keras_graft import criteria, grafting, layouts, reactivation

import testing_utils  # noqa: F401  (two logical CPUs, as in every test file)
from test_criteria import np_entropy
from test_grafting import np_alpha


def np_rows(array, axes):
    """One row per filter, written independently of the library: filter axes moved last, then flattened."""
    axes = sorted(a % array.ndim for a in axes)
    other = [i for i in range(array.ndim) if i not in axes]
    moved = np.transpose(array, other + axes)
    return moved.reshape(-1, int(np.prod([array.shape[a] for a in axes]))).T


@layouts.register(kernel="w", filter_axes=0, input_axis=1)
class TorchConv2D(keras.layers.Layer):
    """A 'valid' 2-D convolution keeping its kernel PyTorch-style, ``w`` of shape (out, in, kh, kw), plus bias ``b``."""

    def __init__(self, filters, size=3, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.size = filters, size

    def build(self, input_shape):
        self.w = self.add_weight(shape=(self.filters, input_shape[-1], self.size, self.size), name="w",
                                 initializer="glorot_uniform")
        self.b = self.add_weight(shape=(self.filters,), name="b", initializer="zeros")

    def call(self, x):
        return keras.ops.conv(x, keras.ops.transpose(self.w, (2, 3, 1, 0))) + self.b


class Unregistered(keras.layers.Layer):
    """A layer with a ``kernel`` whose class is not registered: it has no filters."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 4), name="kernel")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel)


class MyConv2D(keras.layers.Conv2D):
    """A Conv2D subclass: registered through its base class."""


def torch_net(seed, filters=(4, 5, 6)):
    """TorchConv2D -> BN -> ReLU -> TorchConv2D -> ... -> global pool -> Dense, every weight drawn from ``seed``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((9, 9, 3))
    x = inputs
    for i, count in enumerate(filters):
        x = TorchConv2D(count, name=f"c{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.name else rng.normal(size=weight.shape)
        weight.assign(value.astype(np.float32))
    return model


LAYOUTS = [((3, 3, 4, 6), (-1,)), ((3, 3, 4, 2), (-2, -1)), ((3, 3, 5, 4), (-2,)), ((6, 4, 3, 3), (0,)),
           ((5, 7), (-1,)), ((2, 3, 4), (2, 0)), ((4,), (0,))]


class RowsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(*LAYOUTS)
    def test_rows_round_trip_against_numpy_transposes(self, shape, axes):
        array = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        rows = layouts.to_rows(array, axes)
        self.assertIsInstance(rows, np.ndarray)
        self.assertAllEqual(rows, np_rows(array, axes))
        tensor_rows = layouts.to_rows(tf.constant(array), axes)
        self.assertIsInstance(tensor_rows, tf.Tensor)
        self.assertAllEqual(tensor_rows, rows)
        self.assertAllEqual(layouts.from_rows(rows, shape, axes), array)
        back = layouts.from_rows(tensor_rows, shape, axes)
        self.assertIsInstance(back, tf.Tensor)
        self.assertAllEqual(back, array)

    @parameterized.parameters(*LAYOUTS)
    def test_filter_shape_broadcasts_one_value_per_row(self, shape, axes):
        """array * v.reshape(filter_shape) scales filter j (row j of to_rows) by v[j]."""
        array = np.random.default_rng(1).normal(size=shape)
        per_filter = np.arange(1.0, np_rows(array, axes).shape[0] + 1)
        scaled = array * per_filter.reshape(layouts.filter_shape(shape, axes))
        self.assertAllClose(np_rows(scaled, axes), np_rows(array, axes) * per_filter[:, None])

    def test_bad_axes(self):
        with self.assertRaisesRegex(ValueError, "Invalid filter axes"):
            layouts.to_rows(np.zeros((2, 3)), (2,))
        with self.assertRaisesRegex(ValueError, "Invalid filter axes"):
            layouts.to_rows(np.zeros((2, 3)), (0, -2))


class RegistryTest(tf.test.TestCase):

    def test_built_in_layouts(self):
        """(kernel attribute, filter axes, input axis, filters) of each built-in layer, per design.md."""
        cases = [
            (keras.layers.Conv2D(6, 3), (1, 8, 8, 3), "kernel", (-1,), -2, 6),
            (MyConv2D(5, 3), (1, 8, 8, 3), "kernel", (-1,), -2, 5),
            (keras.layers.Conv2DTranspose(4, 3), (1, 6, 6, 3), "kernel", (-2,), -1, 4),
            (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (1, 8, 8, 3), "kernel", (-2, -1), None, 6),
            (keras.layers.SeparableConv1D(5, 3), (1, 8, 3), "pointwise_kernel", (-1,), None, 5),
            (keras.layers.Dense(7), (1, 5), "kernel", (-1,), -2, 7),
            (TorchConv2D(4), (1, 6, 6, 3), "w", (0,), 1, 4),
        ]
        for layer, input_shape, attribute, axes, input_axis, filters in cases:
            layer.build(input_shape)
            kernel, kernel_axes = layouts.primary_kernel(layer)
            self.assertIs(kernel, getattr(layer, attribute), layer.name)
            self.assertEqual(kernel_axes, axes, layer.name)
            self.assertEqual(layouts.input_axis(layer), input_axis, layer.name)
            self.assertEqual(layouts.num_filters(layer), filters, layer.name)
            self.assertTrue(layouts.has_kernel(layer) and not layouts.is_normalization(layer))
        norm = keras.layers.BatchNormalization()
        norm.build((1, 5))
        self.assertTrue(layouts.is_normalization(norm) and not layouts.has_kernel(norm))
        self.assertEqual(layouts.num_filters(norm), 5)

    def test_output_axes(self):
        layer = keras.layers.SeparableConv2D(5, 3)
        layer.build((1, 8, 8, 3))
        self.assertEqual(layouts.output_axes(layer, layer.pointwise_kernel), (-1,))
        self.assertIsNone(layouts.output_axes(layer, layer.depthwise_kernel))  # its channels are the inputs
        self.assertEqual(layouts.output_axes(layer, layer.bias), (0,))
        torch = TorchConv2D(4)
        torch.build((1, 6, 6, 3))
        self.assertEqual(layouts.output_axes(torch, torch.w), (0,))

    def test_filter_layers_count_dense_only_when_asked(self):
        model = torch_net(0)
        self.assertEqual([layer.name for layer in layouts.filter_layers(model)], ["c0", "c1", "c2"])
        self.assertEqual([layer.name for layer in layouts.filter_layers(model, include_dense=True)],
                         ["c0", "c1", "c2", "head"])

    def test_unregistered_layer_has_no_filters(self):
        """An unregistered layer is left out of filter counts; asking for its kernel names the fix."""
        inputs = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        model = keras.Model(inputs, Unregistered(name="custom")(x))
        custom = model.get_layer("custom")
        self.assertFalse(layouts.has_kernel(custom))
        self.assertEqual([layer.name for layer in layouts.filter_layers(model, include_dense=True)], ["conv"])
        self.assertEqual(criteria.invalid_filters(model).total, 4)
        with self.assertRaisesRegex(ValueError, r"'custom' \(Unregistered\) has no registered kernel.*register"):
            layouts.primary_kernel(custom)
        self.assertIsNone(layouts.output_axes(custom, custom.kernel))
        self.assertEqual(grafting.Grafter(model).group_names, ["conv", "custom"])

    def test_register_checks_its_arguments(self):
        with self.assertRaisesRegex(TypeError, "Keras layer class"):
            layouts.register(int)
        with self.assertRaisesRegex(ValueError, "filter_axes"):
            layouts.register(Unregistered, filter_axes=())
        with self.assertRaisesRegex(TypeError, "kernel"):
            layouts.register(Unregistered, kernel=3)
        self.assertIsNone(layouts.layout(Unregistered()))


class CustomLayerTest(tf.test.TestCase):
    """TorchConv2D keeps filters on axis 0: filter j of layer c<i> is ``w[j]``."""

    def test_criteria_see_its_filters(self):
        model = torch_net(1)
        w = model.get_layer("c1").w
        value = w.numpy()
        value[[0, 3]] *= 1e-3  # two filters with L1 norm far below 0.1
        w.assign(value)
        kernel, axes = layouts.primary_kernel(model.get_layer("c1"))
        self.assertAllClose(criteria.entropy(kernel, per_filter=True, filter_axes=axes),
                            [np_entropy(value[j]) for j in range(5)], rtol=1e-5)
        self.assertAllClose(criteria.l1_norm(kernel, filter_axes=axes), np.abs(value).sum(axis=(1, 2, 3)),
                            rtol=1e-5)
        report = criteria.invalid_filters(model, threshold=0.1)
        self.assertEqual(report.per_layer, [("c0", 0, 4), ("c1", 2, 5), ("c2", 0, 6)])
        stats = keras_graft.FilterStats(thresholds=[0.1]).measure(model)
        self.assertEqual(stats["invalid_filters"], 2)
        self.assertAllClose(stats["invalid_filter_ratio"], 2 / 15)
        self.assertAllClose(stats["mean_entropy"],
                            np.mean([np_entropy(model.get_layer(f"c{i}").w.numpy()) for i in range(3)]), rtol=1e-5)

    def test_filter_level_graft_mixes_its_filters(self):
        """alpha_j = 0.5 + (a / pi) atan(c (H_j - H'_j)) from per-filter entropies of w[j]; c<i>'s kernel mixes
        filter j with alpha_j and input channel k (axis 1) with the previous layer's alpha_k."""
        model, peer = torch_net(2), torch_net(3)
        own = {w.path: w.numpy() for w in model.weights}
        theirs = {w.path: w.numpy() for w in peer.weights}
        result = grafting.graft(model, peer, criterion="entropy", level="filter")
        now = {w.path: w.numpy() for w in model.weights}
        self.assertEqual(result.group_names, ["c0", "c1", "c2", "head"])
        alphas = []
        for i in range(3):
            w, w_peer = own[f"c{i}/w"], theirs[f"c{i}/w"]
            alphas.append(np.array([np_alpha(np_entropy(w[j]), np_entropy(w_peer[j])) for j in range(w.shape[0])]))
        for i in range(3):
            coefficient = alphas[i][:, None, None, None] * (alphas[i - 1][None, :, None, None] if i else 1.0)
            expected = {f"c{i}/w": coefficient}
            for name in (f"c{i}/b", f"bn{i}/gamma", f"bn{i}/beta", f"bn{i}/moving_mean", f"bn{i}/moving_variance"):
                expected[name] = alphas[i]
            for path, alpha in expected.items():
                self.assertAllClose(now[path], alpha * own[path] + (1 - alpha) * theirs[path], rtol=1e-4, atol=1e-5,
                                    msg=path)

    def test_internal_scion_grafts_its_filters(self):
        """InternalScion: the i-th smallest invalid filter w[f] += the i-th largest w[g] (L1 norms)."""
        model = torch_net(4)
        w = model.get_layer("c2").w
        value = w.numpy()
        value[1] *= 1e-4
        w.assign(value)
        keras_graft.InternalScion(threshold=0.1).apply(model, 0)
        norms = np.abs(value).sum(axis=(1, 2, 3))
        expected = value.copy()
        expected[1] = value[1] + value[np.argmax(norms)]
        self.assertAllClose(w.numpy(), expected)

    def test_repr_drops_and_holds_its_filters(self):
        """RePr ranks c1 and c2 by L1 norm of w[j] (the lowest go) and holds w[j], b[j], and BN's j at zero."""
        model = torch_net(5)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        kernels = {}
        record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: kernels.setdefault(
            epoch, {name: model.get_layer(name).w.numpy() for name in ("c1", "c2")}))
        repr_callback = reactivation.RePr(s1=1, s2=2, prune_ratio=0.3, cycles=1, criterion="l1")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 9, 9, 3)).astype(np.float32), np.arange(16) % 3
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[record, repr_callback])
        scores = [np.abs(kernels[0][name]).sum(axis=(1, 2, 3)) for name in ("c1", "c2")]
        expected = reactivation.select_filters(scores, 0.3, higher_is_better=True)
        indices = repr_callback.history[0]["indices"]
        self.assertEqual(indices, {name: e.tolist() for name, e in zip(("c1", "c2"), expected) if e.size})
        self.assertEqual(sum(len(d) for d in indices.values()), 3)  # round(0.3 * 11 filters)
        for name, dropped in indices.items():
            layer = model.get_layer(name)
            self.assertAllEqual(layer.w.numpy()[dropped], np.zeros_like(layer.w.numpy()[dropped]))
            self.assertAllEqual(layer.b.numpy()[dropped], np.zeros(len(dropped)))
            self.assertAllEqual(model.get_layer("bn" + name[1:]).gamma.numpy()[dropped], np.zeros(len(dropped)))
            kept = np.setdiff1d(np.arange(layer.filters), dropped)
            self.assertTrue(np.all(np.abs(layer.w.numpy()[kept]).sum(axis=(1, 2, 3)) > 0))

    def test_repr_leaves_a_layer_registered_depthwise_alone(self):
        @layouts.register(kernel="w", filter_axes=0, input_axis=1, depthwise=True)
        class FlaggedConv2D(TorchConv2D):
            """Registered as depthwise: RePr does not rank it."""

        self.assertTrue(layouts.layout(FlaggedConv2D(2)).depthwise)
        self.assertTrue(layouts.layout(keras.layers.DepthwiseConv2D(3)).depthwise)
        self.assertFalse(layouts.layout(TorchConv2D(2)).depthwise)
        keras.utils.set_random_seed(1)
        inputs = keras.Input((9, 9, 3))
        x = TorchConv2D(4, name="c0")(inputs)
        x = TorchConv2D(5, name="c1")(x)
        x = FlaggedConv2D(6, name="c2")(x)
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        repr_callback = reactivation.RePr(s1=1, s2=1, prune_ratio=0.4, cycles=1, criterion="l1")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 9, 9, 3)).astype(np.float32), np.arange(16) % 3
        model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[repr_callback])
        self.assertEqual(list(repr_callback.history[0]["indices"]), ["c1"])
        self.assertLen(repr_callback.history[0]["indices"]["c1"], 2)  # round(0.4 * 5): c1's filters only


if __name__ == "__main__":
    tf.test.main()
