"""GraftConfig: validation naming the argument, get_config/from_config and keras.saving round trips, round_due,
and its use by Grafting, GraftTrainer and the ring."""

import keras
import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import criteria

import testing_utils  # noqa: F401 (splits the CPU before TensorFlow starts)


def small_net(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="head")])


class GraftConfigTest(tf.test.TestCase):

    def test_defaults(self):
        config = keras_graft.GraftConfig()
        self.assertIsInstance(config.criterion, criteria.Entropy)
        self.assertEqual((config.a, config.c, config.level, config.every_n_epochs, config.layers, config.final_graft),
                         (0.4, 500.0, "layer", 1, None, False))
        self.assertIsInstance(keras_graft.GraftConfig(level="filter").criterion, criteria.BNScale)

    def test_errors_name_the_argument(self):
        for kwargs, error, message in [
                ({"a": "0.4"}, TypeError, "GraftConfig: a must be a number, got '0.4'"),
                ({"a": 1.5}, ValueError, r"a must lie in \[0, 1\], got a=1.5"),
                ({"c": -1.0}, ValueError, "c must be a finite number >= 0, got c=-1.0"),
                ({"level": "channel"}, ValueError, "Unknown grafting level 'channel'"),
                ({"every_n_epochs": 0}, ValueError, "GraftConfig: every_n_epochs must be an integer >= 1, got 0"),
                ({"every_n_epochs": "2"}, TypeError, "every_n_epochs must be an integer, got '2'"),
                ({"layers": 3}, TypeError, "GraftConfig: layers must be None, a layer name"),
                ({"final_graft": "yes"}, TypeError, "GraftConfig: final_graft must be True or False, got 'yes'"),
                ({"criterion": "nope"}, ValueError, "nope")]:
            with self.assertRaisesRegex(error, message):
                keras_graft.GraftConfig(**kwargs)
        with self.assertRaisesRegex(TypeError, "Grafting: a must be a number"):
            keras_graft.Grafting(a="0.4")

    def test_get_config_round_trip(self):
        config = keras_graft.GraftConfig(criterion="l1", a=0.3, c=100, level="filter", every_n_epochs=3,
                                         layers=["conv"], final_graft=True)
        saved = config.get_config()
        self.assertEqual(saved, {"criterion": {"class_name": "L1Norm", "config": {}}, "a": 0.3, "c": 100.0,
                                 "level": "filter", "every_n_epochs": 3, "layers": ["conv"], "final_graft": True})
        clone = keras_graft.GraftConfig.from_config(saved)
        self.assertEqual(clone.get_config(), saved)
        self.assertIsInstance(clone.criterion, criteria.L1Norm)

    def test_keras_serialization(self):
        config = keras_graft.GraftConfig(criterion="entropy", a=0.2, every_n_epochs=2)
        serialized = keras.saving.serialize_keras_object(config)
        self.assertEqual(serialized["registered_name"], "keras_graft>GraftConfig")
        clone = keras.saving.deserialize_keras_object(serialized)
        self.assertIsInstance(clone, keras_graft.GraftConfig)
        self.assertEqual(clone.get_config(), config.get_config())

    def test_round_due(self):
        config = keras_graft.GraftConfig(every_n_epochs=3)
        self.assertEqual([config.round_due(e) for e in range(7)], [False, False, True, False, False, True, False])

    def test_grafting_holds_a_config(self):
        config = keras_graft.GraftConfig(a=0.2, level="filter", every_n_epochs=2)
        callback = keras_graft.Grafting([small_net(1)], config=config)
        self.assertIs(callback.config, config)
        self.assertEqual((callback.a, callback.level, callback.every_n_epochs), (0.2, "filter", 2))
        self.assertIsInstance(callback.criterion, criteria.BNScale)
        self.assertEqual(keras_graft.Grafting(a=0.2).config.get_config(),
                         keras_graft.GraftConfig(a=0.2).get_config())
        with self.assertRaisesRegex(ValueError, "not both.*a, level"):
            keras_graft.Grafting(config=config, a=0.3, level="filter")
        with self.assertRaisesRegex(TypeError, "config must be None or a keras_graft.GraftConfig"):
            keras_graft.Grafting(config={"a": 0.3})

    def test_trainer_takes_a_config_a_dict_or_a_callback(self):
        def trainer(grafting):
            return keras_graft.GraftTrainer(lambda: small_net(0), 2, optimizer="sgd",
                                            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                            grafting=grafting, seed=1)

        for grafting in (keras_graft.GraftConfig(a=0.3, every_n_epochs=2), {"a": 0.3, "every_n_epochs": 2},
                         keras_graft.Grafting(a=0.3, every_n_epochs=2)):
            settings = trainer(grafting).grafting
            self.assertIsInstance(settings, keras_graft.GraftConfig)
            self.assertEqual((settings.a, settings.every_n_epochs), (0.3, 2))

    def test_ring_from_config_matches_graft(self):
        models = [small_net(1), small_net(2)]
        expected = [[w.numpy() for w in m.weights] for m in models]
        a = 0.4 / np.pi
        ring = keras_graft.GraftConfig(layers=["conv"]).ring(models)
        ring()
        # Entropy of each conv kernel (10 bins over [min, max], last bin closed) drives alpha.
        infos = []
        for weights in expected:
            kernel = weights[0].ravel()
            counts, _ = np.histogram(kernel, bins=10, range=(kernel.min(), kernel.max()))
            p = counts[counts > 0] / kernel.size
            infos.append(-np.sum(p * np.log(p)))
        alpha = 0.5 + a * np.arctan(500.0 * (infos[0] - infos[1]))
        self.assertAllClose(models[0].weights[0].numpy(), alpha * expected[0][0] + (1 - alpha) * expected[1][0],
                            rtol=1e-5, atol=1e-6)
        self.assertAllEqual(models[0].weights[2].numpy(), expected[0][2])  # head not selected


if __name__ == "__main__":
    tf.test.main()
