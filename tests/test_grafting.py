"""The graft against NumPy: coefficient, layer level, filter level, rings, bad input, strategies."""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_graft import grafting

import testing_utils
from test_criteria import np_entropy


def np_alpha(h_self, h_peer, a=0.4, c=500.0):
    return 0.5 + a / math.pi * math.atan(c * (h_self - h_peer))


def small_net(seed, channels=(4, 5), name=None):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> global pool -> dense."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(channels[0], 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(channels[1], 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name=name)
    rng = np.random.default_rng(seed)
    for weight in model.weights:  # make every weight, BN statistics included, distinct
        shape = weight.shape
        value = rng.uniform(0.5, 1.5, shape) if "variance" in weight.name else rng.normal(size=shape)
        weight.assign(value.astype(np.float32))
    return model


def layer_weights(model, layer):
    return [w.numpy() for w in model.get_layer(layer).weights]


class CoefficientTest(tf.test.TestCase):

    def test_alpha_matches_formula(self):
        for h_self, h_peer in [(2.0, 1.99), (1.0, 1.5), (0.3, 0.3)]:
            for a, c in [(0.4, 500.0), (1.0, 1.0), (0.0, 500.0)]:
                self.assertAllClose(grafting.adaptive_coefficient(h_self, h_peer, a, c), np_alpha(h_self, h_peer, a, c))

    def test_alpha_range(self):
        alphas = grafting.adaptive_coefficient(tf.constant([-10.0, 10.0]), 0.0, 0.4, 500.0).numpy()
        self.assertGreater(alphas[0], 0.3)
        self.assertLess(alphas[1], 0.7)


class LayerLevelTest(tf.test.TestCase):

    def test_layer_level_graft_matches_numpy(self):
        model, peer = small_net(1), small_net(2)
        before = {layer: layer_weights(model, layer) for layer in ("conv1", "bn1", "conv2", "bn2", "head")}
        theirs = {layer: layer_weights(peer, layer) for layer in before}
        result = grafting.graft(model, peer)

        groups = {"conv1": ("conv1", "bn1"), "conv2": ("conv2", "bn2"), "head": ("head",)}
        expected_alphas = []
        for kernel_layer, members in groups.items():
            alpha = np_alpha(np_entropy(before[kernel_layer][0]), np_entropy(theirs[kernel_layer][0]))
            expected_alphas.append(alpha)
            for layer in members:  # kernel, bias, gamma, beta, moving mean, moving variance
                for own, other, now in zip(before[layer], theirs[layer], layer_weights(model, layer)):
                    self.assertAllClose(now, alpha * own + (1 - alpha) * other, rtol=1e-5, atol=1e-6)
        self.assertAllClose(result.alphas, expected_alphas, rtol=1e-5)
        # The peer distance covers the grafted trainable weights (not the BN moving statistics), before the round.
        # Each layer's first two weights: kernel and bias, or gamma and beta.
        trainable = [(layer, i) for layer in ("conv1", "bn1", "conv2", "bn2", "head") for i in range(2)]
        gap = sum(np.sum((before[layer][i] - theirs[layer][i]) ** 2) for layer, i in trainable)
        norm = sum(np.sum(before[layer][i] ** 2) for layer, i in trainable)
        logs = result.logs()
        self.assertEqual(sorted(logs), ["graft_alpha", "graft_alpha_spread", "graft_layers", "graft_peer_distance",
                                        "graft_skipped_layers"])
        self.assertAllClose(logs["graft_alpha"], np.mean(expected_alphas), rtol=1e-6)
        self.assertAllClose(logs["graft_alpha_spread"], np.mean(np.abs(np.array(expected_alphas) - 0.5)), rtol=1e-5)
        self.assertAllClose(logs["graft_peer_distance"], np.sqrt(gap / norm), rtol=1e-5)
        self.assertEqual((logs["graft_layers"], logs["graft_skipped_layers"]), (3, 0))
        self.assertGreater(logs["graft_alpha_spread"], 0.0)
        # Grafting the same peer again: the distance shrinks by the mixing (model and peer have moved closer).
        again = grafting.graft(model, peer).logs()
        self.assertLess(again["graft_peer_distance"], logs["graft_peer_distance"])
        # The peer is untouched.
        for layer in theirs:
            for old, now in zip(theirs[layer], layer_weights(peer, layer)):
                self.assertAllEqual(old, now)

    def test_restrict_layers(self):
        model, peer = small_net(1), small_net(2)
        before = {w.path: w.numpy() for w in model.weights}
        result = grafting.graft(model, peer, layers=["conv2"])
        self.assertEqual(result.group_names, ["conv2"])
        for w in model.weights:
            changed = not np.array_equal(before[w.path], w.numpy())
            self.assertEqual(changed, w.path.startswith(("conv2/", "bn2/")), w.path)
        only_head = grafting.graft(small_net(3), peer, layers=lambda layer: layer.name == "head")
        self.assertEqual(only_head.group_names, ["head"])
        with self.assertRaisesRegex(ValueError, r"\['conv9'\] are not in the model"):
            grafting.graft(model, peer, layers=["conv9"])

    def test_two_models_in_a_ring_end_equal(self):
        models = [small_net(1), small_net(2)]
        before = [[w.numpy() for w in m.weights] for m in models]
        results = grafting.RingGrafter(models)()
        for x, y in zip(models[0].weights, models[1].weights):
            self.assertAllClose(x.numpy(), y.numpy(), rtol=1e-6, atol=1e-6)
        # Each read the other's weights from before the round: model 0 = alpha * own + (1 - alpha) * peer.
        alpha = np_alpha(np_entropy(before[0][0]), np_entropy(before[1][0]))
        self.assertAllClose(models[0].weights[0].numpy(), alpha * before[0][0] + (1 - alpha) * before[1][0],
                            rtol=1e-5)
        self.assertAllClose(results[0].alphas + results[1].alphas, np.ones(3), rtol=1e-6)
        # The mean alpha over the two models is 0.5 by construction; the spread and the distance are not.
        logs = [r.logs() for r in results]
        self.assertAllClose((logs[0]["graft_alpha"] + logs[1]["graft_alpha"]) / 2, 0.5, rtol=1e-6)
        self.assertAllClose(logs[0]["graft_alpha_spread"], logs[1]["graft_alpha_spread"], rtol=1e-5)
        self.assertAllClose(logs[0]["graft_alpha_spread"], np.mean(np.abs(results[0].alphas - 0.5)), rtol=1e-5)
        trainable = [i for i, w in enumerate(models[0].weights) if w.trainable]
        for k in range(2):
            own, peer = before[k], before[1 - k]
            expected = np.sqrt(sum(np.sum((own[i] - peer[i]) ** 2) for i in trainable)
                               / sum(np.sum(own[i] ** 2) for i in trainable))
            self.assertAllClose(logs[k]["graft_peer_distance"], expected, rtol=1e-5)
        # After the round the two models are equal: the next round measures distance 0 and mixes nothing new.
        again = [r.logs() for r in grafting.RingGrafter(models)()]
        self.assertAllClose([again[0]["graft_peer_distance"], again[1]["graft_peer_distance"]], [0.0, 0.0],
                            atol=1e-6)
        self.assertAllClose(again[0]["graft_alpha_spread"], 0.0, atol=1e-6)

    def test_ring_of_three_reads_pre_round_weights(self):
        models = [small_net(s) for s in (1, 2, 3)]
        before = [models[k].get_layer("head").kernel.numpy() for k in range(3)]
        grafting.RingGrafter(models, layers=["head"])()
        for k in range(3):
            own, peer = before[k], before[(k - 1) % 3]
            alpha = np_alpha(np_entropy(own), np_entropy(peer))
            self.assertAllClose(models[k].get_layer("head").kernel.numpy(), alpha * own + (1 - alpha) * peer,
                                rtol=1e-5)

    def test_unhealthy_model_is_not_grafted_into_others(self):
        models = [small_net(1), small_net(2)]
        before = [m.get_weights() for m in models]
        results = grafting.RingGrafter(models)(healthy=[True, False])
        for old, now in zip(before[0], models[0].get_weights()):  # model 0 takes from unhealthy model 1
            self.assertAllEqual(old, now)
        self.assertEqual(results[0].logs()["graft_skipped_layers"], 3)
        self.assertEqual(results[1].logs()["graft_skipped_layers"], 0)


class FilterLevelTest(tf.test.TestCase):

    def test_filter_level_graft_matches_numpy(self):
        model, peer = small_net(1), small_net(2)
        own = {layer: layer_weights(model, layer) for layer in ("conv1", "bn1", "conv2", "bn2", "head")}
        other = {layer: layer_weights(peer, layer) for layer in own}
        grafting.graft(model, peer, level="filter")

        def ratio(layer):
            g_self, g_peer = np.abs(own[layer][0]), np.abs(other[layer][0])
            return g_self / (g_self + g_peer)

        a1, a2 = ratio("bn1"), ratio("bn2")
        mix = lambda alpha, x, y: alpha * x + (1 - alpha) * y  # noqa: E731
        now = {layer: layer_weights(model, layer) for layer in own}
        # conv1: output filter j with a1[j]; its bias and bn1 per channel.
        self.assertAllClose(now["conv1"][0], mix(a1, own["conv1"][0], other["conv1"][0]), rtol=1e-5)
        self.assertAllClose(now["conv1"][1], mix(a1, own["conv1"][1], other["conv1"][1]), rtol=1e-5)
        for k in range(4):
            self.assertAllClose(now["bn1"][k], mix(a1, own["bn1"][k], other["bn1"][k]), rtol=1e-5)
        # conv2: output filter j with a2[j], input channel i with a1[i] (the reference's two successive mixes).
        coefficient = a2[None, None, None, :] * a1[None, None, :, None]
        self.assertAllClose(now["conv2"][0], mix(coefficient, own["conv2"][0], other["conv2"][0]), rtol=1e-5)
        for k in range(4):
            self.assertAllClose(now["bn2"][k], mix(a2, own["bn2"][k], other["bn2"][k]), rtol=1e-5)
        # head has no BN: layer-level entropy alpha, and its inputs (bn2's channels through the pool) a2.
        alpha = np_alpha(np_entropy(own["head"][0]), np_entropy(other["head"][0]))
        self.assertAllClose(now["head"][0], mix(alpha * a2[:, None], own["head"][0], other["head"][0]), rtol=1e-5)
        self.assertAllClose(now["head"][1], mix(alpha, own["head"][1], other["head"][1]), rtol=1e-5)

    def test_filter_level_with_per_filter_entropy(self):
        model, peer = small_net(1), small_net(2)
        own, other = model.get_layer("conv1").kernel.numpy(), peer.get_layer("conv1").kernel.numpy()
        grafting.graft(model, peer, criterion="entropy", level="filter", layers=["conv1"])
        alpha = np.array([np_alpha(np_entropy(own[..., j]), np_entropy(other[..., j])) for j in range(4)])
        self.assertAllClose(model.get_layer("conv1").kernel.numpy(), alpha * own + (1 - alpha) * other, rtol=1e-5)


class BadInputTest(tf.test.TestCase):

    def test_mismatched_architecture_names_the_weight(self):
        model, peer = small_net(1), small_net(2, channels=(4, 6))
        before = model.get_weights()
        with self.assertRaisesRegex(ValueError, r"conv2/kernel.*\(3, 3, 4, 5\).*\(3, 3, 4, 6\)"):
            grafting.graft(model, peer)
        with self.assertRaisesRegex(ValueError, "same architecture"):
            grafting.RingGrafter([model, peer])
        for old, now in zip(before, model.get_weights()):
            self.assertAllEqual(old, now)

    def test_hyperparameters(self):
        model, peer = small_net(1), small_net(2)
        with self.assertRaisesRegex(ValueError, r"a must lie in \[0, 1\]"):
            grafting.graft(model, peer, a=1.5)
        with self.assertRaisesRegex(ValueError, "c must be"):
            grafting.graft(model, peer, c=-1.0)
        with self.assertRaisesRegex(ValueError, "Unknown grafting level 'channel'"):
            grafting.graft(model, peer, level="channel")
        with self.assertRaisesRegex(ValueError, "Unknown criterion"):
            grafting.graft(model, peer, criterion="variance")
        with self.assertRaisesRegex(ValueError, "at least 2 models"):
            grafting.RingGrafter([model])

    def test_unbuilt_model(self):
        unbuilt = keras.Sequential([keras.layers.Dense(3)])
        with self.assertRaisesRegex(ValueError, "not built"):
            grafting.Grafter(unbuilt)

    def test_non_finite_peer_layer_is_not_mixed_in(self):
        model, peer = small_net(1), small_net(2)
        kernel = peer.get_layer("conv2").kernel
        kernel.assign(np.where(np.arange(kernel.numpy().size).reshape(kernel.shape) == 3, np.nan,
                               kernel.numpy()).astype(np.float32))
        peer.get_layer("bn1").moving_variance.assign(np.full((4,), np.inf, np.float32))
        before = {layer: layer_weights(model, layer) for layer in ("conv1", "bn1", "conv2", "bn2", "head")}
        with self.assertLogs(level="WARNING") as logs:
            result = grafting.graft(model, peer)
        self.assertEqual(sorted(result.skipped), ["conv1", "conv2"])
        self.assertEqual(result.logs()["graft_skipped_layers"], 2)
        self.assertTrue(any("'conv2'" in line and "not finite" in line for line in logs.output))
        # Spread and distance cover the grafted group only (head), and stay finite.
        head = (before["head"], layer_weights(peer, "head"))
        expected = np.sqrt(sum(np.sum((o - p) ** 2) for o, p in zip(*head)) / sum(np.sum(o ** 2) for o in head[0]))
        self.assertAllClose(result.logs()["graft_peer_distance"], expected, rtol=1e-5)
        self.assertAllClose(result.alpha_spread, abs(result.alphas[2] - 0.5), rtol=1e-5)
        for layer in ("conv1", "bn1", "conv2", "bn2"):
            for old, now in zip(before[layer], layer_weights(model, layer)):
                self.assertAllEqual(old, now)
        self.assertNotAllClose(before["head"][0], layer_weights(model, "head")[0])
        self.assertTrue(all(np.isfinite(w).all() for w in model.get_weights()))


class LogsTest(tf.test.TestCase):

    def test_idle_logs_have_the_keys_of_a_round(self):
        result = grafting.graft(small_net(1), small_net(2))
        idle = grafting.idle_logs()
        self.assertEqual(sorted(idle), sorted(result.logs()))
        self.assertEqual(idle, {"graft_alpha": 1.0, "graft_alpha_spread": 0.0, "graft_peer_distance": 0.0,
                                "graft_layers": 0, "graft_skipped_layers": 0})

    def test_filter_level_spread_averages_over_filters(self):
        model, peer = small_net(1), small_net(2)
        g_self, g_peer = (np.abs(m.get_layer("bn1").gamma.numpy()) for m in (model, peer))
        result = grafting.graft(model, peer, level="filter", layers=["conv1"])
        self.assertAllClose(result.alpha_spread, np.mean(np.abs(g_self / (g_self + g_peer) - 0.5)), rtol=1e-5)

    def test_graft_arrays_logs_the_same_as_graft_model(self):
        model, twin, peer = small_net(1), small_net(1), small_net(2)
        from_model = grafting.Grafter(model).graft_model(peer).logs()
        from_arrays = grafting.Grafter(twin).graft_arrays(peer.get_weights()).logs()
        for key, value in from_model.items():
            self.assertAllClose(from_arrays[key], value, rtol=1e-6, msg=key)

    def test_type_errors_name_the_argument(self):
        model, peer = small_net(1), small_net(2)
        with self.assertRaisesRegex(TypeError, "a must be a number, got '0.4'"):
            grafting.Grafter(model, a="0.4")
        with self.assertRaisesRegex(TypeError, "c must be a number, got None"):
            grafting.RingGrafter([model, peer], c=None)


class StrategyTest(tf.test.TestCase):

    def test_ring_under_mirrored_strategy_keeps_replicas_equal(self):
        strategy = testing_utils.mirrored_strategy()
        with strategy.scope():
            models = [small_net(1), small_net(2)]
            for m in models:
                m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)
        y = np.arange(16) % 3
        for m in models:
            m.fit(x, y, batch_size=8, epochs=1, verbose=0)
        before = [[w.numpy() for w in m.weights] for m in models]
        grafting.RingGrafter(models)()
        for x0, x1, old0, old1 in zip(models[0].weights, models[1].weights, *before):
            replicas = strategy.experimental_local_results(x0.value)
            self.assertLen(replicas, 2)
            self.assertAllEqual(replicas[0], replicas[1])
            self.assertAllClose(x0.numpy(), x1.numpy(), rtol=1e-5, atol=1e-6)
        alpha = np_alpha(np_entropy(before[0][0]), np_entropy(before[1][0]))
        self.assertAllClose(models[0].weights[0].numpy(), alpha * before[0][0] + (1 - alpha) * before[1][0],
                            rtol=1e-5)


if __name__ == "__main__":
    tf.test.main()
