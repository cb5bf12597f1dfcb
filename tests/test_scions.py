"""Noise and internal scions against NumPy: which filters they touch, the noise schedule, the rank pairing,
model.fit, MirroredStrategy and bad input."""

import os

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import scions

import testing_utils

# (layer, kernel attribute, filter axes) of conv_net, written out here rather than taken from keras_graft.layouts.
KERNELS = [
    ("conv", "kernel", (3,)),
    ("depthwise", "kernel", (2, 3)),
    ("transpose", "kernel", (2,)),
    ("separable", "pointwise_kernel", (3,)),
]


def conv_net(seed=0, name=None):
    """Conv2D(8) -> DepthwiseConv2D(x2, 16 filters) -> BN -> Conv2DTranspose(6) -> SeparableConv2D(5) -> Dense(3)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2DTranspose(6, 3, name="transpose")(x)
    x = keras.layers.SeparableConv2D(5, 3, name="separable")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name=name)
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = rng.uniform(0.5, 1.5, weight.shape) if "variance" in weight.name else rng.normal(size=weight.shape)
        weight.assign(value.astype(np.float32))
    return model


def kernel_of(model, layer, attribute):
    return getattr(model.get_layer(layer), attribute)


def np_columns(kernel, axes):
    """(values per filter, filters) view of a kernel: filter axes moved last, in order, then flattened."""
    moved = np.moveaxis(kernel, axes, list(range(kernel.ndim - len(axes), kernel.ndim)))
    return moved.reshape(-1, int(np.prod([kernel.shape[a] for a in axes])))


def np_from_columns(columns, shape, axes):
    rest = [shape[a] for a in range(len(shape)) if a not in axes]
    moved = columns.reshape(rest + [shape[a] for a in axes])
    return np.moveaxis(moved, list(range(len(shape) - len(axes), len(shape))), axes)


def shrink(model, invalid_per_layer, seed=0):
    """Scales the given number of filters of each KERNELS layer (chosen at random) to an L1 norm far below 0.1."""
    rng = np.random.default_rng(seed)
    for (layer, attribute, axes), count in zip(KERNELS, invalid_per_layer):
        kernel = kernel_of(model, layer, attribute)
        columns = np_columns(kernel.numpy(), axes)
        chosen = rng.choice(columns.shape[1], count, replace=False)
        columns[:, chosen] *= 1e-4
        kernel.assign(np_from_columns(columns, kernel.shape, axes))


def np_internal(kernel, axes, threshold):
    """The paper's internal graft of one kernel, filter by filter: (new kernel, filters grafted)."""
    columns = np_columns(kernel.astype(np.float64), axes)
    norms = np.abs(columns).sum(axis=0)
    ascending = np.argsort(norms, kind="stable")
    new = columns.copy()
    grafted = 0
    for i, small in enumerate(ascending):
        large = ascending[len(ascending) - 1 - i]
        if norms[small] < threshold and norms[large] >= threshold:
            new[:, small] = columns[:, small] + columns[:, large]
            grafted += 1
    return np_from_columns(new, kernel.shape, axes), grafted


def invalid_mask(kernel, axes, threshold=0.1):
    return np.abs(np_columns(kernel, axes)).sum(axis=0) < threshold


class NoiseScionTest(tf.test.TestCase):

    def test_noise_touches_only_invalid_filters_with_scale_a_to_the_t(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 16))
        model = keras.Model(inputs, keras.layers.Conv2D(64, 3, name="wide")(inputs))
        rng = np.random.default_rng(0)
        start = rng.normal(size=(3, 3, 16, 64)).astype(np.float32)
        start[..., :48] *= 1e-5  # 48 invalid filters of 144 values each
        scion = scions.NoiseScion(threshold=0.1, sigma_decay=0.8, initial_sigma=2.0, seed=7)
        for round_index in (0, 4, 12):
            model.get_layer("wide").kernel.assign(start)
            result = scion.apply(model, round_index)
            added = model.get_layer("wide").kernel.numpy() - start
            self.assertEqual(result.filters, 48)
            self.assertEqual(result.invalid, 48)
            self.assertAllEqual(added[..., 48:], np.zeros_like(added[..., 48:]))
            sigma = 2.0 * 0.8**round_index
            self.assertAllClose(scion.sigma(round_index), sigma)
            self.assertAllClose(np.std(added[..., :48]), sigma, rtol=0.05)
            self.assertLess(abs(np.mean(added[..., :48])), 5 * sigma / np.sqrt(added[..., :48].size))

    def test_every_layer_kind_only_invalid_filters_change(self):
        model = conv_net(1)
        shrink(model, [3, 10, 2, 1])
        before = {layer: kernel_of(model, layer, attr).numpy() for layer, attr, _ in KERNELS}
        head = model.get_layer("head").kernel.numpy()
        result = scions.NoiseScion(seed=0).apply(model, 1)
        self.assertEqual(result.layer_names, ["conv", "depthwise", "transpose", "separable"])
        self.assertAllEqual(result.grafted_per_layer, [3, 10, 2, 1])
        # No peer: spread and peer distance keep their neutral values.
        self.assertEqual(result.logs(), {"graft_alpha": 1.0, "graft_alpha_spread": 0.0, "graft_peer_distance": 0.0,
                                         "graft_layers": 4, "graft_skipped_layers": 0, "scion_filters": 16})
        self.assertEqual(sorted(scions.NoiseScion(seed=0).idle_logs()), sorted(result.logs()))
        for layer, attribute, axes in KERNELS:
            invalid = invalid_mask(before[layer], axes)
            old = np_columns(before[layer], axes)
            new = np_columns(kernel_of(model, layer, attribute).numpy(), axes)
            self.assertAllEqual(new[:, ~invalid], old[:, ~invalid])
            self.assertTrue(np.all(new[:, invalid] != old[:, invalid]))
        self.assertAllEqual(model.get_layer("head").kernel.numpy(), head)

    def test_noise_is_a_function_of_seed_and_round(self):
        def noised(seed, round_index):
            model = conv_net(2)
            shrink(model, [3, 10, 2, 1])
            scions.NoiseScion(seed=seed).apply(model, round_index)
            return kernel_of(model, "conv", "kernel").numpy()

        self.assertAllEqual(noised(5, 3), noised(5, 3))
        self.assertNotAllClose(noised(5, 3), noised(5, 4))
        self.assertNotAllClose(noised(5, 3), noised(6, 3))


class InternalScionTest(tf.test.TestCase):

    def test_rank_pairing_and_values_match_numpy(self):
        model = conv_net(3)
        # depthwise: 10 of 16 invalid, so ranks 6..9 meet invalid partners; separable: 3 of 5, the middle rank
        # meets itself; transpose: none.
        shrink(model, [3, 10, 0, 3], seed=3)
        before = {layer: kernel_of(model, layer, attr).numpy() for layer, attr, _ in KERNELS}
        result = scions.InternalScion(threshold=0.1).apply(model, 0)
        expected_counts = []
        for layer, attribute, axes in KERNELS:
            expected, grafted = np_internal(before[layer], axes, 0.1)
            expected_counts.append(grafted)
            now = kernel_of(model, layer, attribute).numpy()
            self.assertAllClose(now, expected, rtol=1e-6, atol=1e-7)
            valid = ~invalid_mask(before[layer], axes)
            self.assertAllEqual(np_columns(now, axes)[:, valid], np_columns(before[layer], axes)[:, valid])
        self.assertEqual(expected_counts, [3, 6, 0, 2])
        self.assertAllEqual(result.grafted_per_layer, expected_counts)
        self.assertAllEqual(result.invalid_per_layer, [3, 10, 0, 3])
        self.assertEqual(result.logs()["graft_layers"], 3)

    def test_smallest_takes_from_largest(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4, 4, 1))
        model = keras.Model(inputs, keras.layers.Conv2D(4, 1, use_bias=False, name="c")(inputs))
        # L1 norms 0.01, 5, 0.02, 3: filter 0 (smallest) takes filter 1 (largest), filter 2 takes filter 3.
        model.get_layer("c").kernel.assign(np.array([[[[0.01, 5.0, -0.02, 3.0]]]], np.float32))
        scions.InternalScion(threshold=0.1).apply(model, 0)
        self.assertAllClose(model.get_layer("c").kernel.numpy().ravel(), [5.01, 5.0, 2.98, 3.0])


class CommonTest(tf.test.TestCase):

    def test_no_invalid_filter_logs_and_changes_nothing(self):
        for scion in (scions.NoiseScion(threshold=1e-3, seed=0), scions.InternalScion(threshold=1e-3)):
            model = conv_net(4)
            before = [w.numpy() for w in model.weights]
            with self.assertLogs(level="INFO") as logs:
                result = scion.apply(model, 0)
            self.assertTrue(any("no filter" in line and "below 0.001" in line for line in logs.output))
            self.assertEqual(result.filters, 0)
            self.assertEqual(result.logs()["graft_layers"], 0)
            for old, weight in zip(before, model.weights):
                self.assertAllEqual(old, weight.numpy())

    def test_get_config_round_trip(self):
        noise = scions.NoiseScion(threshold=0.01, sigma_decay=0.5, initial_sigma=0.3, seed=11)
        self.assertEqual(noise.get_config(), {"threshold": 0.01, "sigma_decay": 0.5, "initial_sigma": 0.3,
                                              "seed": 11})
        self.assertEqual(scions.NoiseScion.from_config(noise.get_config()).get_config(), noise.get_config())
        internal = scions.InternalScion(threshold=0.05)
        self.assertEqual(scions.InternalScion.from_config(internal.get_config()).threshold, 0.05)
        self.assertIn("sigma_decay=0.5", repr(noise))

    def test_bad_input(self):
        for bad in (-0.1, float("nan"), float("inf")):
            with self.assertRaisesRegex(ValueError, "threshold"):
                scions.InternalScion(threshold=bad)
            with self.assertRaisesRegex(ValueError, "threshold"):
                scions.NoiseScion(threshold=bad)
        for bad in (0.0, 1.0, 1.5, -0.5):
            with self.assertRaisesRegex(ValueError, "sigma_decay"):
                scions.NoiseScion(sigma_decay=bad)
        with self.assertRaisesRegex(ValueError, "initial_sigma"):
            scions.NoiseScion(initial_sigma=0.0)
        with self.assertRaisesRegex(ValueError, "seed"):
            scions.NoiseScion(seed=1.5)
        # Wrong types name the argument and the value.
        with self.assertRaisesRegex(TypeError, "InternalScion: threshold must be a number, got '0.1'"):
            scions.InternalScion(threshold="0.1")
        with self.assertRaisesRegex(TypeError, "NoiseScion: sigma_decay must be a number, got None"):
            scions.NoiseScion(sigma_decay=None)
        with self.assertRaisesRegex(TypeError, "NoiseScion: initial_sigma must be a number, got '1'"):
            scions.NoiseScion(initial_sigma="1")
        with self.assertRaisesRegex(TypeError, "NoiseScion: seed must be an integer, got 'abc'"):
            scions.NoiseScion(seed="abc")
        with self.assertRaisesRegex(ValueError, r"NoiseScion: sigma_decay must be a number in \(0, 1\), got 1.0"):
            scions.NoiseScion(sigma_decay=1.0)
        model = conv_net(0)
        for bad in (-1, 1.5):
            with self.assertRaisesRegex(ValueError, "round_index"):
                scions.NoiseScion().apply(model, bad)
        inputs = keras.Input((4,))
        dense_only = keras.Model(inputs, keras.layers.Dense(2)(inputs))
        with self.assertRaisesRegex(ValueError, "convolution layers"):
            scions.InternalScion().apply(dense_only, 0)


def compiled(model):
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 8, 8, 3)).astype(np.float32), np.arange(n) % 3


class Snapshot(keras.callbacks.Callback):
    """The model's weights at each epoch's end and begin (placed after Grafting: after the round opening it)."""

    def __init__(self):
        super().__init__()
        self.weights, self.begin = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begin.append({w.path: w.numpy() for w in self.model.weights})

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append({w.path: w.numpy() for w in self.model.weights})


class FitTest(tf.test.TestCase):

    def test_fit_with_noise_scion(self):
        model = compiled(conv_net(5))
        snapshot = Snapshot()
        # Every filter is invalid below threshold 1e3, so every convolution kernel gets noise in each round; the
        # round after epoch 1 opens epoch 2.
        history = model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                            callbacks=[keras_graft.Grafting(peers=scions.NoiseScion(threshold=1e3, seed=0)), snapshot])
        self.assertEqual(history.history["graft_alpha"], [1.0, 1.0])
        self.assertEqual(history.history["graft_layers"], [0, 4])
        self.assertEqual(history.history["graft_skipped_layers"], [0, 0])
        self.assertEqual(history.history["scion_filters"][0], 0)
        for layer, attribute, _ in KERNELS:
            path = kernel_of(model, layer, attribute).path
            self.assertTrue(np.all(snapshot.begin[1][path] != snapshot.weights[0][path]))
        self.assertAllEqual(snapshot.begin[1]["head/kernel"], snapshot.weights[0]["head/kernel"])


def small_conv_net(seed=0):
    """Conv2D(4) -> Flatten -> Dense(3) on 6x6x2 inputs; filters 0 and 1 of the convolution are invalid."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="head")])
    kernel = model.get_layer("conv").kernel
    kernel.assign(kernel.numpy() * np.array([1e-4, 1e-4, 1.0, 1.0], np.float32))
    return model


def small_data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6, 6, 2)).astype(np.float32), np.arange(n) % 3


class ScionStateTest(tf.test.TestCase):
    """The drawn seed is a variable attached to the grafted model: checkpoints carry it."""

    def test_seed_is_a_variable_outside_the_weights(self):
        model = small_conv_net()
        scion = scions.NoiseScion(seed=None)
        weights = len(model.weights)
        state = scion.track(model)
        self.assertEqual(int(state.seed.numpy()), scion._seed)
        self.assertIs(scion.track(model), state)
        self.assertLen(model.weights, weights)
        self.assertNotIn(state, model.layers)
        path = os.path.join(self.get_temp_dir(), "seed.weights.h5")
        model.save_weights(path)
        other = small_conv_net()
        other_state = scions.NoiseScion(seed=None).track(other)
        other_state.seed.assign(scion._seed + 1)
        other.load_weights(path)
        self.assertEqual(int(other_state.seed.numpy()), scion._seed)

    def test_fit_with_backup_and_restore_resumes_the_drawn_seed(self):
        x, y = small_data()

        def run(scion, backup_dir=None, interrupt=None, epochs=4):
            model = small_conv_net()
            model.compile(optimizer=keras.optimizers.SGD(0.05),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            callbacks = [keras_graft.Grafting(scion)]
            if backup_dir is not None:
                callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
            if interrupt is not None:
                callbacks.append(testing_utils.interrupt_after(interrupt))
            model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
            return model

        # Threshold 1e3: every filter is invalid, so every round adds noise.
        interrupted = scions.NoiseScion(threshold=1e3, seed=None)
        backup = os.path.join(self.get_temp_dir(), "fit_backup")
        with self.assertRaises(KeyboardInterrupt):
            run(interrupted, backup, interrupt=1)
        restarted = scions.NoiseScion(threshold=1e3, seed=None)
        self.assertNotEqual(restarted._seed, interrupted._seed)
        resumed = run(restarted, backup)
        full = run(scions.NoiseScion(threshold=1e3, seed=interrupted._seed))
        other_seed = run(scions.NoiseScion(threshold=1e3, seed=restarted._seed))
        for a, b in zip(full.weights, resumed.weights):
            self.assertAllEqual(a.numpy(), b.numpy(), msg=a.path)
        self.assertNotAllClose(other_seed.get_layer("conv").kernel.numpy(), resumed.get_layer("conv").kernel.numpy())


class TrainerScionTest(tf.test.TestCase):
    """GraftTrainer(grafting=Grafting(scion)): each model grafts from its own copy, with the ring's timing."""

    def make_trainer(self, scion, **kwargs):
        return keras_graft.GraftTrainer(small_conv_net, 2, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), grafting=keras_graft.Grafting(scion), seed=1, **kwargs)

    def test_noise_scion_per_model(self):
        x, y = small_data()
        # Learning rate 0: only the scion changes the weights; both models start from model 0's weights.
        trainer = self.make_trainer(scions.NoiseScion(seed=0), optimizer=keras.optimizers.SGD(0.0),
                                    shared_initialization=True)
        before = [[w.numpy() for w in m.weights] for m in trainer.models]
        ends = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: ends.append([[w.numpy() for w in m.weights] for m in trainer.models]))
        history = trainer.fit((x, y), epochs=3, batch_size=8, verbose=0, callbacks=[record])
        self.assertEqual(history.history["scion_filters_0"], [0, 2, 0])  # no round opens epoch 0
        self.assertEqual(history.history["scion_filters"], [0, 4, 0])
        self.assertEqual(history.history["graft_alpha_1"], [1.0, 1.0, 1.0])  # a scion does not scale the weights
        self.assertEqual(history.history["graft_layers"], [0, 2, 0])
        self.assertEqual(history.history["graft_peer_distance_0"], [0.0, 0.0, 0.0])
        self.assertAllEqual(ends[0][0][0], before[0][0])  # epoch 0: nothing grafted
        for k in range(2):
            kernel, old = ends[1][k][0], before[k][0]
            self.assertTrue(np.all(kernel[..., :2] != old[..., :2]))  # invalid filters took noise
            self.assertAllEqual(kernel[..., 2:], old[..., 2:])  # valid filters unchanged
            for new, previous in zip(ends[1][k][1:], before[k][1:]):
                self.assertAllEqual(new, previous)  # bias and Dense unchanged
        self.assertAllEqual(before[0][0], before[1][0])
        self.assertNotAllClose(ends[1][0][0][..., :2], ends[1][1][0][..., :2])  # each model its own noise
        own = scions.NoiseScion(seed=0).for_member(1)
        model = small_conv_net()
        model.set_weights(before[1])
        own.apply(model, 0)
        self.assertAllEqual(model.weights[0].numpy(), ends[1][1][0])  # model 1: the copy for_member(1), round 0

    def test_internal_scion_and_ring_timing(self):
        x, y = small_data()
        trainer = keras_graft.GraftTrainer(
            small_conv_net, 2, optimizer=keras.optimizers.SGD(0.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), seed=1,
            grafting=keras_graft.Grafting(scions.InternalScion(), every_n_epochs=2, final_graft=True))
        before = [m.weights[0].numpy() for m in trainer.models]
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        self.assertEqual(history.history["scion_filters_1"], [0, 0])  # the round after epoch 2 is the final one
        for k, model in enumerate(trainer.models):
            columns = before[k].reshape(-1, 4)
            order = np.argsort(np.abs(columns).sum(axis=0), kind="stable")
            expected = columns.copy()
            for i in (0, 1):
                expected[:, order[i]] += columns[:, order[3 - i]]
            self.assertAllEqual(model.weights[0].numpy(), expected.reshape(before[k].shape))

    def test_backup_dir_resumes_the_drawn_seed(self):
        x, y = small_data()

        def run(scion, backup_dir=None, interrupt=None):
            trainer = self.make_trainer(scion, optimizer=keras.optimizers.SGD(0.05), backup_dir=backup_dir)
            callbacks = [] if interrupt is None else [testing_utils.interrupt_after(interrupt)]
            trainer.fit((x, y), epochs=4, batch_size=8, verbose=0, callbacks=callbacks)
            return trainer

        interrupted = scions.NoiseScion(threshold=1e3, seed=None)
        backup = os.path.join(self.get_temp_dir(), "trainer_backup")
        with self.assertRaises(KeyboardInterrupt):
            run(interrupted, backup, interrupt=1)
        restarted = scions.NoiseScion(threshold=1e3, seed=None)
        resumed = run(restarted, backup)
        full = run(scions.NoiseScion(threshold=1e3, seed=interrupted._seed))
        for a, b in zip(full.ensemble.get_weights(), resumed.ensemble.get_weights()):
            self.assertAllEqual(a, b)
        self.assertNotEqual(restarted._seed, interrupted._seed)

    def test_sources_without_copies_are_refused(self):
        with self.assertRaisesRegex(ValueError, "peers=None"):
            self.make_trainer(small_conv_net(), optimizer="sgd")


class StrategyTest(tf.test.TestCase):

    def assertReplicasEqual(self, strategy, weights):
        for weight in weights:
            replicas = strategy.experimental_local_results(weight.value)
            self.assertLen(replicas, 2)
            self.assertAllEqual(replicas[0], replicas[1])

    def test_scions_keep_replicas_equal_and_match_one_device(self):
        strategy = testing_utils.mirrored_strategy()
        with strategy.scope():
            distributed = conv_net(6)
            shrink(distributed, [3, 10, 2, 3])
        local = conv_net(6)
        shrink(local, [3, 10, 2, 3])
        for scion in (scions.NoiseScion(seed=2), scions.InternalScion()):
            self.assertEqual(scion.apply(distributed, 1).filters, scion.apply(local, 1).filters)
            self.assertReplicasEqual(strategy, distributed.weights)
            for mirrored, single in zip(distributed.weights, local.weights):
                self.assertAllClose(mirrored.numpy(), single.numpy(), rtol=1e-6, atol=1e-7)

    def test_fit_with_scion_keeps_replicas_equal(self):
        strategy = testing_utils.mirrored_strategy()
        with strategy.scope():
            model = compiled(conv_net(7))
        history = model.fit(*data(), batch_size=8, epochs=2, verbose=0,
                            callbacks=[keras_graft.Grafting(peers=scions.NoiseScion(threshold=1e3, seed=1))])
        self.assertEqual(history.history["graft_layers"], [0, 4])
        # BatchNormalization's moving statistics drift apart between replicas in training; the kernels must not.
        self.assertReplicasEqual(strategy, [kernel_of(model, layer, attribute) for layer, attribute, _ in KERNELS])


if __name__ == "__main__":
    tf.test.main()
