"""The step both loops share (keras_graft.steps): atomic updates, loss scaling under mixed precision, metrics."""
import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_graft
from keras_graft import steps

import testing_utils
from test_trainer import LOGITS_LOSS, build_model, make_trainer, tiny_data


def state(models, optimizers):
    """Every variable of the models (BatchNorm statistics included, on every replica) and of their optimizers."""
    variables = [v for model in models for v in model.variables]
    variables += [v for optimizer in optimizers for v in optimizer.variables]
    return [np.stack([np.asarray(r) for r in tf.distribute.get_strategy().experimental_local_results(v.value)])
            if hasattr(v.value, "values") else v.numpy() for v in variables]


def assert_unchanged(test, before, after):
    test.assertEqual(len(before), len(after))
    for a, b in zip(before, after):
        test.assertAllEqual(a, b)


class AtomicStepTest(tf.test.TestCase, parameterized.TestCase):
    """A batch whose labels are out of range fails in the loss: no model, statistic or optimizer may change."""

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_peer_ensemble(self, strategy):
        strategy = testing_utils.strategy(strategy)
        x, y = tiny_data(8)
        y[-1] = 7  # 3 classes; with two replicas only the second replica's half fails.
        with strategy.scope():
            peers = keras_graft.PeerEnsemble([build_model(batch_norm=True) for _ in range(2)])
            peers.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOGITS_LOSS, metrics=["accuracy"])
        with strategy.scope():
            before = state(peers.peers, [*peers.peer_optimizers, peers.optimizer])
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"7 is not in \[0, 3\)"):
            peers.fit(x, y, batch_size=8, epochs=1, verbose=0)
        with strategy.scope():
            assert_unchanged(self, before, state(peers.peers, [*peers.peer_optimizers, peers.optimizer]))

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_graft_trainer_model_with_a_good_batch_waits_for_the_others(self, strategy):
        strategy = testing_utils.strategy(strategy)
        x, y = tiny_data(8)
        bad = y.copy()
        bad[-1] = 7

        def dataset_fn(model_index, input_context):
            labels = bad if model_index == 1 else y
            batch = input_context.get_per_replica_batch_size(8)
            data = tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)
            return data.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)

        trainer = make_trainer(2, strategy=strategy, model_fn=lambda: build_model(batch_norm=True))
        with trainer.strategy.scope():
            before = state(trainer.models, trainer.optimizers)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, r"7 is not in \[0, 3\)"):
            trainer.fit(dataset_fn, epochs=1, steps_per_epoch=1, verbose=0)
        with trainer.strategy.scope():
            assert_unchanged(self, before, state(trainer.models, trainer.optimizers))


class MixedPrecisionTest(tf.test.TestCase, parameterized.TestCase):
    """Under mixed_float16 each model's optimizer scales its loss and unscales the gradients (LossScaleOptimizer)."""

    def tearDown(self):
        keras.mixed_precision.set_global_policy("float32")
        super().tearDown()

    def steps(self, loop, policy):
        """Weight changes of two models after two SGD steps, computed in ``policy``."""
        keras.mixed_precision.set_global_policy(policy)
        x, y = tiny_data(16)
        keras.utils.set_random_seed(4)
        if loop == "ensemble":
            peers = keras_graft.PeerEnsemble([build_model() for _ in range(2)])
            peers.compile(optimizer=keras.optimizers.SGD(0.05), loss=LOGITS_LOSS, metrics=["accuracy"])
            models, optimizers = peers.peers, peers.peer_optimizers
            before = peers.get_weights()
            history = peers.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        else:
            trainer = make_trainer(2, optimizer=keras.optimizers.SGD(0.05), data_order="shared", seed=4)
            models, optimizers = trainer.models, trainer.optimizers
            before = trainer.ensemble.get_weights()
            history = trainer.fit((x, y), batch_size=8, epochs=1, verbose=0)
        after = [w for model in models for w in model.get_weights()]
        return [b - a for a, b in zip(before, after)], optimizers, history.history["loss"][0]

    @parameterized.parameters("ensemble", "trainer")
    def test_loss_scaling(self, loop):
        exact, _, exact_loss = self.steps(loop, "float32")
        mixed, optimizers, mixed_loss = self.steps(loop, "mixed_float16")
        for optimizer in optimizers:
            self.assertIsInstance(optimizer, keras.optimizers.LossScaleOptimizer)
            self.assertEqual(int(optimizer.iterations.numpy()), 2)
        self.assertAllClose(mixed_loss, exact_loss, rtol=1e-2)
        # Unscaled gradients would move the weights 2**15 times too far, unscaled losses 2**15 times too little.
        for a, b in zip(exact, mixed):
            self.assertAllClose(b, a, atol=2e-3 * np.max(np.abs(a)) + 1e-6, rtol=5e-2)


class TrackerTest(tf.test.TestCase):

    def test_accuracy_follows_the_label_shapes(self):
        logits = np.array([[2.0, 0.1, 0.3], [0.1, 0.2, 3.0], [1.0, 2.0, 0.0]], np.float32)
        tracker = steps.Tracker(["accuracy", "mae"], "_0")
        self.assertEqual([m.name for m in tracker.all()], ["loss_0", "accuracy_0", "mae_0"])
        tracker.update(tf.constant(0.5), np.array([0, 2, 2]), logits)  # sparse labels
        self.assertAllClose(tracker.results()["accuracy"], 2 / 3)
        tracker.reset()
        tracker.update(tf.constant(0.5), np.eye(3, dtype=np.float32)[[0, 1, 1]], logits)  # one-hot labels
        self.assertAllClose(tracker.results()["accuracy"], 2 / 3)
        binary = steps.Tracker(["acc"], "_ensemble")
        binary.update(tf.constant(0.5), np.array([[1.0], [0.0]]), np.array([[0.9], [0.8]], np.float32))
        self.assertAllClose(binary.results(), {"loss": 0.5, "acc": 0.5})
        self.assertEqual(binary.all()[1].name, "acc_ensemble")

    def test_metric_objects_are_copied_per_model(self):
        auc = keras.metrics.AUC(name="auc")
        trackers = [steps.Tracker([auc], f"_{k}") for k in range(2)]
        self.assertIsNot(trackers[0].metric("auc"), trackers[1].metric("auc"))
        self.assertEqual(trackers[1].metric("auc").name, "auc_1")

    def test_resolve_loss(self):
        self.assertIsInstance(steps.resolve_loss("sparse_categorical_crossentropy"),
                              keras.losses.SparseCategoricalCrossentropy)
        self.assertIs(steps.resolve_loss(LOGITS_LOSS), LOGITS_LOSS)
        self.assertFalse(steps.probability_loss(LOGITS_LOSS).get_config()["from_logits"])
        self.assertEqual(steps.output_activation(LOGITS_LOSS, (None, 3)), "softmax")
        self.assertEqual(steps.output_activation(LOGITS_LOSS, (None, 1)), "sigmoid")
        with self.assertRaisesRegex(ValueError, "needs a loss"):
            steps.resolve_loss(None)


if __name__ == "__main__":
    tf.test.main()
