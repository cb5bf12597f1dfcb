"""Tests of GraftTrainer: strategies, grafting, diversity, callbacks and logs, NaN handling, backup, bad input."""
import contextlib
import csv
import glob
import io
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from absl.testing import parameterized

from keras_graft import schedules, strategies
from keras_graft.callbacks import FilterStats, Grafting
from keras_graft.trainer import GraftTrainer, PeerEnsemble
import processes
import testing_utils

WORKER = os.path.join(os.path.dirname(__file__), "_trainer_worker.py")
LOGITS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_model(batch_norm=False, units=3):
    """A tiny convolutional classifier (a few hundred weights) with an L2 regulariser."""
    layers = [keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-2))]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers += [keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(units)]
    return keras.Sequential(layers)


def tiny_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.integers(0, 3, size=n)


def make_trainer(num_models=2, **kwargs):
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1, momentum=0.9))
    kwargs.setdefault("loss", LOGITS_LOSS)
    kwargs.setdefault("metrics", ["accuracy"])
    kwargs.setdefault("seed", 1)
    model_fn = kwargs.pop("model_fn", build_model)
    return GraftTrainer(model_fn, num_models, **kwargs)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)


def max_difference(weights_a, weights_b):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(weights_a, weights_b))


class LearningRateTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(1, 2, 4, 6)
    def test_spread_matches_numpy(self, n):
        k = np.arange(1, n + 1)
        expected = 0.1 * (1 + np.cos(np.pi * (n - k) / n)) / 2
        self.assertAllClose(schedules.spread_learning_rates(0.1, n), expected)
        self.assertAllClose(schedules.spread_learning_rates(0.1, n)[-1], 0.1)

    def test_trainer_spreads_initial_rates(self):
        trainer = make_trainer(4, lr_spread=True, optimizer=keras.optimizers.SGD(0.2))
        rates = [float(opt.learning_rate.numpy()) for opt in trainer.optimizers]
        self.assertAllClose(rates, 0.2 * (1 + np.cos(np.pi * (4 - np.arange(1, 5)) / 4)) / 2)

    def test_cosine_annealing_matches_numpy(self):
        schedule = schedules.CosineAnnealing(0.1, epochs=3, steps_per_epoch=4, alpha=0.1)
        t = np.arange(0, 15)
        expected = 0.1 * (0.1 + 0.9 * (1 + np.cos(np.pi * np.minimum(t, 12) / 12)) / 2)
        self.assertAllClose([float(schedule(s)) for s in t], expected, atol=1e-7)

    def test_step_decay_matches_numpy(self):
        schedule = schedules.StepDecay(0.1, every_epochs=2, steps_per_epoch=3, factor=0.5)
        t = np.arange(0, 20)
        self.assertAllClose([float(schedule(s)) for s in t], 0.1 * 0.5 ** (t // 6), atol=1e-7)

    def test_milestone_decay_matches_numpy(self):
        schedule = schedules.StepDecay(0.1, None, steps_per_epoch=3, factor=0.1, milestones=[2, 5])
        t = np.arange(0, 21)
        expected = 0.1 * 0.1 ** ((t >= 6).astype(int) + (t >= 15).astype(int))
        self.assertAllClose([float(schedule(s)) for s in t], expected, atol=1e-9)
        factory = schedules.schedule_factory({"name": "step", "milestones": [2, 5]}, 10, 3)
        self.assertAllClose(float(factory(0.1)(14)), 0.01)
        for kwargs in ({"every_epochs": 2, "milestones": [3]}, {"milestones": [3, 2]}, {"milestones": []}):
            with self.assertRaisesRegex(ValueError, "StepDecay"):
                schedules.StepDecay(0.1, steps_per_epoch=3, **{"every_epochs": None, **kwargs})

    def test_schedules_round_trip_config(self):
        for schedule in (schedules.CosineAnnealing(0.1, 3, 4), schedules.StepDecay(0.1, 2, 3),
                         schedules.StepDecay(0.1, None, 3, milestones=[2, 5])):
            clone = schedule.__class__.from_config(schedule.get_config())
            self.assertAllClose(float(clone(7)), float(schedule(7)))

    def test_trainer_cosine_schedule_per_step(self):
        x, y = tiny_data(32)
        trainer = make_trainer(2, lr_spread=True, lr_schedule="cosine", grafting=None)
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        # 4 steps per epoch, 8 in all: after epoch 1, t = 4 = T / 2.
        first = [history.history[f"learning_rate_{k}"][0] for k in range(2)]
        self.assertAllClose(first, np.array([0.05, 0.1]) * 0.5, atol=1e-6)
        self.assertAllClose([history.history[f"learning_rate_{k}"][1] for k in range(2)], [0.0, 0.0], atol=1e-7)

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_learning_rate_callbacks_reach_every_model(self, strategy):
        """Keras' callbacks set model 0's rate (the ensemble's optimizer); every model follows at its spread ratio."""
        x, y = tiny_data(32)
        trainer = make_trainer(2, optimizer=keras.optimizers.SGD(0.1), lr_spread=True, grafting=None,
                               strategy=testing_utils.strategy(strategy))
        plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=100.0)
        history = trainer.fit((x, y), epochs=3, batch_size=8, verbose=0, callbacks=[plateau])
        # No improvement of 100 after epoch 1: the rates halve after epoch 2 (and again after epoch 3).
        rates = [history.history[f"learning_rate_{k}"] for k in range(2)]
        self.assertAllClose(rates, [[0.05, 0.05, 0.025], [0.1, 0.1, 0.05]])
        self.assertAllClose(float(trainer.optimizers[0].learning_rate.numpy()), 0.0125)

    def test_followed_rates_only_for_settable_rates(self):
        sgd = keras.optimizers.SGD
        self.assertIsNone(schedules.FollowedRates.create(sgd(schedules.CosineAnnealing(0.1, 3, 4)), [sgd(0.1)]))
        self.assertIsNone(schedules.FollowedRates.create(sgd(0.1), [sgd(schedules.CosineAnnealing(0.1, 3, 4))]))
        self.assertIsNone(schedules.FollowedRates.create(sgd(0.0), [sgd(0.1)]))
        leader, followers = sgd(0.2), [sgd(0.1), sgd(0.3)]
        followed = schedules.FollowedRates.create(leader, followers)
        self.assertFalse(bool(followed()))  # unchanged: nothing to do
        self.assertAllClose([float(f.learning_rate.numpy()) for f in followers], [0.1, 0.3])
        leader.learning_rate = 0.02
        self.assertTrue(bool(followed()))
        self.assertAllClose([float(f.learning_rate.numpy()) for f in followers], [0.01, 0.03])
        self.assertFalse(bool(followed()))

    def test_schedule_arguments_are_named(self):
        with self.assertRaisesRegex(TypeError, "CosineAnnealing: alpha must be a number, got '0'"):
            schedules.CosineAnnealing(0.1, 10, 5, alpha="0")
        with self.assertRaisesRegex(TypeError, "StepDecay: every_epochs must be an integer, got '60'"):
            schedules.StepDecay(0.1, "60")
        with self.assertRaisesRegex(TypeError, "StepDecay: milestones must be a list of epochs, got '60'"):
            schedules.StepDecay(0.1, None, milestones="60")
        with self.assertRaisesRegex(TypeError, "StepDecay: initial_learning_rate must be a number, got None"):
            schedules.StepDecay(None, 60)
        self.assertEqual(schedules.StepDecay(0.1, None, milestones=np.array([2, 5])).milestones, [2, 5])
        with self.assertRaisesRegex(TypeError, "PeerEnsemble: peers must be a non-empty list of Keras models"):
            PeerEnsemble("peers")

    def test_step_schedule_spec(self):
        factory = schedules.schedule_factory({"name": "step", "every_epochs": 1, "factor": 0.5}, 10, 2)
        self.assertAllClose(float(factory(0.4)(5)), 0.4 * 0.5**2)


class TrainerTest(tf.test.TestCase, parameterized.TestCase):

    def _fit_weights_and_losses(self, strategy):
        x, y = tiny_data(32)
        trainer = make_trainer(2, strategy=strategy)
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        return trainer, [w for model in trainer.models for w in model.get_weights()], history.history["loss_1"]

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_every_strategy_gives_the_default_strategy_weights(self, strategy):
        trainer, weights, losses = self._fit_weights_and_losses(testing_utils.strategy(strategy))
        self.assertEqual(trainer.strategy.num_replicas_in_sync, 2 if strategy == "mirrored" else 1)
        _, reference_weights, reference_losses = self._fit_weights_and_losses(None)
        self.assertLess(max_difference(reference_weights, weights), 1e-5)
        self.assertAllClose(reference_losses, losses, atol=1e-5)

    def test_keras_loss_divides_by_the_number_of_replicas(self):
        """The trap the train step relies on: the default reduction already scales by 1 / replicas."""
        strategy = testing_utils.mirrored_strategy()
        logits = tf.constant([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
        labels = tf.constant([0, 2])
        per_replica = strategy.run(tf.function(lambda: LOGITS_LOSS(labels, logits)))
        expected = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))) / 2
        for value in strategy.experimental_local_results(per_replica):
            self.assertAllClose(float(value), expected)

    def test_mirrored_batch_norm_statistics_agree_between_replicas(self):
        x, y = tiny_data(32)
        trainer = make_trainer(2, strategy=testing_utils.mirrored_strategy(),
                               model_fn=lambda: build_model(batch_norm=True))
        trainer.fit((x, y), epochs=1, batch_size=8, verbose=0)
        for model in trainer.models:
            for variable in model.non_trainable_weights:
                replicas = trainer.strategy.experimental_local_results(variable.value)
                self.assertAllClose(replicas[0], replicas[1])

    def test_grafting_makes_two_models_equal_after_each_graft(self):
        x, y = tiny_data(32)
        differences = []

        class Record(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                peers = self.model.peers
                differences.append(max_difference(peers[0].get_weights(), peers[1].get_weights()))

        trainer = make_trainer(2, grafting=Grafting(every_n_epochs=2), lr_spread=True,
                               model_fn=lambda: build_model(batch_norm=True))
        history = trainer.fit((x, y), epochs=4, batch_size=8, verbose=0, callbacks=[Record()])
        # The round after epoch 2 opens epoch 3; no round follows the final epoch 4.
        self.assertGreater(differences[0], 1e-3)
        self.assertGreater(differences[1], 1e-3)
        self.assertLess(differences[2], 1e-6)
        self.assertGreater(differences[3], 1e-3)
        self.assertGreater(max_difference(trainer.models[0].get_weights(), trainer.models[1].get_weights()), 1e-3)
        self.assertEqual(history.history["graft_layers"], [0, 0, 4, 0])
        self.assertEqual(history.history["graft_alpha_0"][1], 1.0)
        alphas = [history.history[f"graft_alpha_{k}"][2] for k in range(2)]
        self.assertAllClose(sum(alphas), 1.0, atol=1e-6)  # arctan is odd: alpha_0 + alpha_1 = 1 for N = 2.
        # So the mean graft_alpha is 0.5; the headline keys move with the graft instead.
        self.assertAllClose(history.history["graft_alpha"][2], 0.5, atol=1e-6)
        spread = history.history["graft_alpha_spread"][2]
        self.assertGreater(spread, 0.0)
        self.assertGreater(history.history["graft_peer_distance"][2], 1e-3)
        for k in range(2):
            self.assertAllClose(history.history[f"graft_alpha_spread_{k}"][2], spread, atol=1e-6)
        # Epochs that no round opened log the same keys at neutral values.
        for epoch in (0, 1, 3):
            self.assertEqual([history.history[key][epoch] for key in ("graft_alpha", "graft_alpha_spread",
                                                                      "graft_peer_distance", "graft_layers")],
                             [1.0, 0.0, 0.0, 0])
            self.assertEqual(history.history["graft_peer_distance_1"][epoch], 0.0)

    def test_peer_distance_measures_the_drift_before_the_round(self):
        x, y = tiny_data(32)
        before_round = []

        class Record(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                peers = self.model.peers
                trainable = [(a.numpy(), b.numpy()) for a, b in zip(peers[0].trainable_weights,
                                                                    peers[1].trainable_weights)]
                before_round.append([np.sqrt(sum(np.sum((o - p) ** 2) for o, p in pairs)
                                             / sum(np.sum(o ** 2) for o, _ in pairs))
                                     for pairs in (trainable, [(b, a) for a, b in trainable])])

        trainer = make_trainer(2, grafting=Grafting(), lr_spread=True)
        history = trainer.fit((x, y), epochs=3, batch_size=8, verbose=0, callbacks=[Record()])
        for epoch in (1, 2):  # The round opening epoch e measured the weights epoch e - 1 ended with.
            for k in range(2):
                self.assertAllClose(history.history[f"graft_peer_distance_{k}"][epoch], before_round[epoch - 1][k],
                                    rtol=1e-4)
        # After the first round the peers start every epoch equal: the drift of one epoch is far smaller than
        # the distance between two random initialisations.
        self.assertLess(history.history["graft_peer_distance"][2], history.history["graft_peer_distance"][1])

    def test_verbose_grafting_prints_one_line_per_round(self):
        x, y = tiny_data(16)
        absl_logger = logging.get_absl_logger()
        level = absl_logger.level  # NOTSET (inherit) unless set: restore exactly that
        absl_logger.setLevel("WARNING")  # printing must not depend on logging being configured
        try:
            printed = {}
            for verbose in (0, 1):
                trainer = make_trainer(2, grafting=Grafting(verbose=verbose))
                output = io.StringIO()
                with contextlib.redirect_stdout(output):
                    trainer.fit((x, y), epochs=3, batch_size=8, verbose=0)
                printed[verbose] = [line for line in output.getvalue().splitlines() if "Grafting" in line]
        finally:
            absl_logger.setLevel(level)
        self.assertEqual(printed[0], [])
        self.assertLen(printed[1], 2)  # rounds after epochs 1 and 2; none after the final epoch
        self.assertRegex(printed[1][0], r"^Grafting 2 models in a ring, round after epoch 1 \(means over the models, "
                                        r"layers summed\): alpha 0\.500, \|alpha - 0\.5\| [0-9.]+, peer distance "
                                        r"[0-9.]+, 4 layers$")
        self.assertIn("round after epoch 2", printed[1][1])

    def test_last_logged_validation_is_what_fit_returns(self):
        x, y = tiny_data(32)
        trainer = make_trainer(2, grafting=Grafting())
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0, validation_data=(x, y))
        results = trainer.evaluate((x, y), batch_size=8)
        for key in ("loss_0", "accuracy_1", "accuracy_ensemble"):
            self.assertAllClose(history.history[f"val_{key}"][-1], results[key], rtol=1e-6)

    def test_final_graft_keeps_the_old_behaviour(self):
        x, y = tiny_data(32)
        trainer = make_trainer(2, grafting=Grafting(final_graft=True))
        trainer.fit((x, y), epochs=1, batch_size=8, verbose=0)
        self.assertLess(max_difference(trainer.models[0].get_weights(), trainer.models[1].get_weights()), 1e-6)

    def test_steps_per_execution_gives_the_same_run(self):
        x, y = tiny_data(40)
        runs = []
        for steps_per_execution in (1, 2):
            trainer = make_trainer(2, grafting=Grafting(), steps_per_execution=steps_per_execution)
            history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)  # 5 steps: calls of 2, 2 and 1.
            runs.append((trainer.ensemble.get_weights(), history.history["loss"]))
            self.assertEqual(int(trainer.optimizers[0].iterations.numpy()), 10)
        self.assertLess(max_difference(runs[0][0], runs[1][0]), 1e-6)
        self.assertAllClose(runs[0][1], runs[1][1], rtol=1e-6)
        with self.assertRaisesRegex(ValueError, "steps_per_execution"):
            make_trainer(2, steps_per_execution=0)

    def test_shared_initialization(self):
        trainer = make_trainer(3, shared_initialization=True)
        for model in trainer.models[1:]:
            self.assertEqual(max_difference(trainer.models[0].get_weights(), model.get_weights()), 0.0)
        self.assertGreater(max_difference(make_trainer(2).models[0].get_weights(),
                                          make_trainer(2).models[1].get_weights()), 1e-3)

    def test_without_grafting_models_differ(self):
        x, y = tiny_data(32)
        trainer = make_trainer(2)
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        self.assertGreater(max_difference(trainer.models[0].get_weights(), trainer.models[1].get_weights()), 1e-3)
        self.assertNotIn("graft_alpha", history.history)

    def test_ring_of_four(self):
        x, y = tiny_data(32)
        trainer = make_trainer(4, grafting={"a": 0.4, "c": 500.0}, lr_spread=True)
        history = trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)
        self.assertEqual(history.history["graft_layers"], [0, 8])
        for k in range(4):
            self.assertIn(f"graft_alpha_{k}", history.history)

    def test_data_order_per_model_shared_and_per_epoch(self):
        x, _ = tiny_data(16)
        labels = np.arange(16)

        def orders(data_order, epoch):
            trainer = make_trainer(2, data_order=data_order, seed=5)
            pipelines, _ = trainer._train_pipelines((x, labels), 16, None)
            return [next(iter(pipelines(k, tf.distribute.InputContext(), epoch)))[1].numpy() for k in range(2)]

        per_model = orders("per_model", 0)
        self.assertNotAllEqual(per_model[0], per_model[1])
        self.assertAllEqual(orders("per_model", 0)[1], per_model[1])
        self.assertNotAllEqual(orders("per_model", 1)[0], per_model[0])
        shared = orders("shared", 0)
        self.assertAllEqual(shared[0], shared[1])

    def test_dataset_function_with_epoch(self):
        x, y = tiny_data(32)
        calls = []

        def dataset_fn(model_index, input_context, epoch):
            calls.append((model_index, epoch))
            batch = input_context.get_per_replica_batch_size(8)
            return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=model_index + 10 * epoch).batch(batch)

        history = make_trainer(2).fit(dataset_fn, epochs=2, verbose=0)
        self.assertLen(history.history["loss_0"], 2)
        self.assertIn((1, 1), calls)

    def test_callbacks_and_logs(self):
        x, y = tiny_data(32)
        path = os.path.join(self.get_temp_dir(), "log.csv")
        stats = FilterStats(thresholds=0.1)
        first_epoch_weights = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch or first_epoch_weights.extend(trainer.ensemble.get_weights()))
        # No accuracy improves by 1: EarlyStopping stops after epoch 2 and restores all peers from epoch 1.
        early = keras.callbacks.EarlyStopping(monitor="val_accuracy_ensemble", mode="max", min_delta=1.0,
                                              patience=0, restore_best_weights=True)
        trainer = make_trainer(2, grafting=Grafting())
        history = trainer.fit((x, y), epochs=5, batch_size=8, validation_data=(x, y), verbose=1,
                              callbacks=[stats, record, early, keras.callbacks.CSVLogger(path),
                                         keras.callbacks.ProgbarLogger()])
        self.assertIsInstance(history, keras.callbacks.History)
        self.assertEqual(history.epoch, [0, 1])
        self.assertLen(first_epoch_weights, 2 * len(trainer.models[0].weights))
        self.assertLess(max_difference(trainer.ensemble.get_weights(), first_epoch_weights), 1e-7)
        self.assertIsNone(stats.models)  # it measures the ensemble's peers: the trainer does not rewire it
        for exposed, own in ((trainer.ensemble.peers, trainer.models),
                             (trainer.ensemble.peer_optimizers, trainer.optimizers)):
            self.assertEqual([id(o) for o in exposed], [id(o) for o in own])
        for key in ("loss", "loss_0", "accuracy_1", "val_loss_0", "val_accuracy_ensemble", "val_loss_ensemble",
                    "graft_alpha_0", "graft_alpha", "invalid_filters_0", "mean_entropy_1", "learning_rate_1",
                    "nonfinite_models"):
            self.assertIn(key, history.history)
        self.assertAllClose(history.history["loss"],
                            np.mean([history.history["loss_0"], history.history["loss_1"]], axis=0))
        with open(path) as f:
            rows = list(csv.DictReader(f))
        self.assertLen(rows, 2)
        self.assertAllClose(float(rows[1]["val_accuracy_ensemble"]), history.history["val_accuracy_ensemble"][1])

    def test_tensorboard(self):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            self.skipTest("tensorboard is not installed")
        x, y = tiny_data(16)
        logdir = self.get_temp_dir()
        board = keras.callbacks.TensorBoard(logdir, histogram_freq=1, write_steps_per_second=True,
                                            update_freq="batch")
        make_trainer(2).fit((x, y), epochs=1, batch_size=8, validation_data=(x, y), verbose=0, callbacks=[board])
        self.assertNotEmpty(os.listdir(os.path.join(logdir, "train")))

    def test_evaluate_and_predict(self):
        x, y = tiny_data(24)
        trainer = make_trainer(2)
        trainer.fit((x, y), epochs=1, batch_size=8, verbose=0)
        results = trainer.evaluate((x, y), batch_size=10)
        outputs = trainer.predict(x, ensemble=False, batch_size=7)
        self.assertLen(outputs, 2)
        for k, (model, logits) in enumerate(zip(trainer.models, outputs)):
            self.assertAllClose(logits, model(x).numpy(), atol=1e-5)
            expected_loss = float(LOGITS_LOSS(y, logits)) + float(sum(model.losses))
            self.assertAllClose(results[f"loss_{k}"], expected_loss, atol=1e-5)
            self.assertAllClose(results[f"accuracy_{k}"], np.mean(np.argmax(logits, -1) == y))
        probabilities = np.mean([tf.nn.softmax(o).numpy() for o in outputs], axis=0)
        self.assertAllClose(trainer.predict(x), probabilities, atol=1e-6)
        self.assertAllClose(trainer.predict(tf.data.Dataset.from_tensor_slices((x, y)).batch(5)), probabilities,
                            atol=1e-6)
        self.assertAllClose(results["accuracy_ensemble"], np.mean(np.argmax(probabilities, -1) == y))
        self.assertAllClose(results["loss_ensemble"],
                            float(keras.losses.sparse_categorical_crossentropy(y, probabilities).numpy().mean()),
                            atol=1e-5)

    def test_ensemble_model_round_trips_config(self):
        trainer = make_trainer(2)
        clone = PeerEnsemble.from_config(trainer.ensemble.get_config())
        self.assertEqual(clone.output_activation, "softmax")
        self.assertLen(clone.peers, 2)

    def test_nan_model_is_not_grafted_and_reported(self):
        x, y = tiny_data(32)
        poisoned = x.copy()
        poisoned[0, 0, 0, 0] = np.nan

        def dataset_fn(model_index, input_context, epoch):
            data = poisoned if (model_index == 1 and epoch >= 1) else x
            return tf.data.Dataset.from_tensor_slices((data, y)).batch(8)

        trainer = make_trainer(2, grafting=Grafting())
        history = trainer.fit(dataset_fn, epochs=3, verbose=0, validation_data=(x, y))
        self.assertEqual(history.history["nonfinite_models"], [0, 1, 1])
        self.assertEqual(history.history["unhealthy_models"], [0, 1, 1])
        self.assertTrue(np.isfinite(history.history["val_loss_ensemble"]).all())  # the NaN model is left out
        self.assertTrue(math.isnan(history.history["loss_1"][1]))
        # The round after epoch 2 (which opens epoch 3): model 0 does not take from model 1.
        self.assertGreater(history.history["graft_skipped_layers_0"][2], 0)
        self.assertEqual(history.history["graft_skipped_layers_1"][2], 0)
        for weight in trainer.models[0].get_weights():
            self.assertTrue(np.all(np.isfinite(weight)))

        trainer = make_trainer(2, grafting=Grafting())
        history = trainer.fit(dataset_fn, epochs=4, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
        self.assertEqual(history.epoch, [0, 1])


class BackupTest(tf.test.TestCase, parameterized.TestCase):
    """backup_dir: exact resume, damaged checkpoints, checkpoints of another configuration."""

    def test_backup_restores_models_and_optimizers(self):
        x, y = tiny_data(16)
        backup = self.get_temp_dir()
        first = make_trainer(2, backup_dir=backup)
        first.fit((x, y), epochs=2, batch_size=8, verbose=0)
        second = make_trainer(2, backup_dir=backup, seed=2)
        history = second.fit((x, y), epochs=2, batch_size=8, verbose=0)
        self.assertEqual(history.epoch, [])
        self.assertLess(max_difference(first.ensemble.get_weights(), second.ensemble.get_weights()), 1e-7)
        for a, b in zip(first.optimizers, second.optimizers):
            self.assertEqual(int(a.iterations.numpy()), int(b.iterations.numpy()))
            self.assertLess(max_difference([v.numpy() for v in a.variables], [v.numpy() for v in b.variables]), 1e-7)

    def test_dropout_model_resumes_bit_exactly(self):
        """The seed generators' states are in the checkpoint: the resumed epochs draw the same dropout masks."""
        x, y = tiny_data(32)

        def dropout_model():
            return keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                     keras.layers.Dropout(0.5), keras.layers.Dense(3)])

        kwargs = dict(model_fn=dropout_model, grafting=Grafting(), lr_spread=True)
        full = make_trainer(2, **kwargs)
        full.fit((x, y), epochs=3, batch_size=8, verbose=0)
        backup = os.path.join(self.get_temp_dir(), "dropout_backup")
        make_trainer(2, backup_dir=backup, **kwargs).fit((x, y), epochs=1, batch_size=8, verbose=0)
        resumed = make_trainer(2, backup_dir=backup, **kwargs)  # restarted with the same arguments
        history = resumed.fit((x, y), epochs=3, batch_size=8, verbose=0)
        self.assertEqual(history.epoch, [1, 2])
        for a, b in zip(full.ensemble.get_weights(), resumed.ensemble.get_weights()):
            self.assertAllEqual(a, b)

    @parameterized.named_parameters(
        ("truncated_data", lambda prefix: _truncate(glob.glob(prefix + ".data-*")[0]), r"\.data-00000-of-00001"),
        ("missing_index", lambda prefix: os.remove(prefix + ".index"), r"ckpt-2\.index.*missing"),
        ("flipped_bits", lambda prefix: _flip(glob.glob(prefix + ".data-*")[0]), r"\.data-00000-of-00001"),
    )
    def test_damaged_latest_checkpoint_falls_back_to_the_previous(self, damage, message):
        x, y = tiny_data(16)
        backup = os.path.join(self.get_temp_dir(), self._testMethodName)
        first = make_trainer(2, backup_dir=backup)
        first.fit((x, y), epochs=1, batch_size=8, verbose=0)
        after_one = first.ensemble.get_weights()
        first.fit((x, y), epochs=2, batch_size=8, verbose=0)
        damage(os.path.join(backup, "ckpt-2"))
        second = make_trainer(2, backup_dir=backup, seed=3)
        with self.assertLogs(level="WARNING") as logs:
            self.assertTrue(second._backup.restore())
        self.assertRegex("\n".join(logs.output), rf"checkpoint .*ckpt-2 is damaged .*{message}.*falling back")
        self.assertLess(max_difference(after_one, second.ensemble.get_weights()), 1e-7)
        self.assertEqual(second.fit((x, y), epochs=2, batch_size=8, verbose=0).epoch, [1])
        for path in glob.glob(os.path.join(backup, "ckpt-*.data-*")):
            _truncate(path)
        with self.assertRaisesRegex(ValueError, r"no intact checkpoint in backup_dir"):
            make_trainer(2, backup_dir=backup).fit((x, y), epochs=3, batch_size=8, verbose=0)

    @parameterized.named_parameters(
        ("more_models", dict(num_models=3), r"number of models: 2 in the checkpoint, 3 here"),
        ("fewer_models", dict(num_models=1), r"number of models: 2 in the checkpoint, 1 here"),
        ("architecture", dict(model_fn=lambda: build_model(units=4)), r"architecture: weight 2 has shape \(64, 3\) "
                                                                        r"\(float32\) in the checkpoint, \(64, 4\)"),
        ("layers", dict(model_fn=lambda: build_model(batch_norm=True)), r"architecture: layers"),
        ("optimizer", dict(optimizer=keras.optimizers.Adam()), r"optimizer of model 0: SGD in the checkpoint, Adam"),
        ("momentum", dict(optimizer=keras.optimizers.SGD(0.1)), r"optimizer of model 0: \d+ variables in the "
                                                               r"checkpoint, \d+ here"),
    )
    def test_checkpoint_of_another_configuration_is_refused(self, change, message):
        x, y = tiny_data(16)
        backup = os.path.join(self.get_temp_dir(), self._testMethodName)
        make_trainer(2, backup_dir=backup).fit((x, y), epochs=1, batch_size=8, verbose=0)
        kwargs = dict(backup_dir=backup, **change)
        num_models = kwargs.pop("num_models", 2)
        trainer = make_trainer(num_models, **kwargs)
        with self.assertRaisesRegex(ValueError, rf"another configuration .*graft_trainer.json.*{message}"):
            trainer.fit((x, y), epochs=2, batch_size=8, verbose=0)


class HealthTest(tf.test.TestCase):
    """Models whose loss is not finite or exploded are neither grafted nor averaged into the ensemble."""

    def test_exploded_model_is_unhealthy_and_not_grafted(self):
        x, y = tiny_data(32)

        def dataset_fn(model_index, input_context, epoch):
            labels = y if (model_index == 0 or epoch == 0) else (y + 1) % 3
            scale = 1.0 if (model_index == 0 or epoch == 0) else 300.0  # confidently wrong: a huge, finite loss
            return tf.data.Dataset.from_tensor_slices((x * scale, labels)).batch(8)

        trainer = make_trainer(2, grafting=Grafting(), optimizer=keras.optimizers.SGD(1e-4))
        with self.assertLogs(level="WARNING") as logs:
            history = trainer.fit(dataset_fn, epochs=3, verbose=0)
        h = history.history
        self.assertEqual(h["nonfinite_models"], [0, 0, 0])
        self.assertEqual(h["unhealthy_models"], [0, 1, 1])
        self.assertGreater(h["loss_1"][1], 10 * h["loss_0"][1])
        self.assertGreater(h["graft_skipped_layers_0"][2], 0)  # the round opening epoch 3: model 1 not taken in
        self.assertEqual(h["graft_skipped_layers_1"][2], 0)
        self.assertRegex("\n".join(logs.output), r"models \[1\] have a loss above 10 x the best")
        relaxed = make_trainer(2, grafting=Grafting(), optimizer=keras.optimizers.SGD(1e-4), max_loss_ratio=None)
        self.assertEqual(relaxed.fit(dataset_fn, epochs=2, verbose=0).history["unhealthy_models"], [0, 0])

    def test_ensemble_averages_healthy_models_only(self):
        x, y = tiny_data(24)
        trainer = make_trainer(2)
        trainer.fit((x, y), epochs=1, batch_size=8, verbose=0)
        healthy_probabilities = tf.nn.softmax(trainer.models[0](x)).numpy()
        trainer._healthy.assign([True, False])  # e.g. model 1 exploded in the last epoch
        self.assertAllClose(trainer.predict(x), healthy_probabilities, atol=1e-6)
        self.assertAllClose(trainer.evaluate((x, y))["loss_ensemble"],
                            float(keras.losses.sparse_categorical_crossentropy(y, healthy_probabilities).numpy()
                                  .mean()), atol=1e-5)
        trainer._healthy.assign([True, True])
        trainer.models[1].set_weights([np.full_like(w, np.nan) for w in trainer.models[1].get_weights()])
        self.assertAllClose(trainer.predict(x), healthy_probabilities, atol=1e-6)  # NaN outputs are left out
        self.assertTrue(np.isfinite(trainer.evaluate((x, y))["loss_ensemble"]))


class KilledProcessTest(tf.test.TestCase):
    """A training process killed after an epoch and restarted ends with the weights of an uninterrupted one."""

    def test_resume_after_kill_equals_uninterrupted_run(self):
        tmp = self.get_temp_dir()
        full, resumed, backup = (os.path.join(tmp, name) for name in ("full.npz", "resumed.npz", "backup"))
        uninterrupted = processes.PythonProcess(WORKER, [f"--out={full}"])
        killed = processes.run(WORKER, [f"--out={resumed}", f"--backup_dir={backup}", "--exit_after_epoch=2"])
        self.assertEqual(killed.returncode, 3, killed.stderr[-2000:])
        self.assertFalse(os.path.exists(resumed))
        restarted = processes.run(WORKER, [f"--out={resumed}", f"--backup_dir={backup}"])
        self.assertEqual(restarted.returncode, 0, restarted.stderr[-2000:])
        self.assertEqual(uninterrupted.wait(timeout=300), 0, uninterrupted.output()[1][-2000:])
        a, b = np.load(full), np.load(resumed)
        self.assertAllEqual(b["epochs_run"], [2, 3])
        self.assertAllEqual(a["iterations"], b["iterations"])
        for key in a.files:
            if key.startswith("m"):
                self.assertAllEqual(a[key], b[key], msg=key)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(0, -1, 1.5, True)
    def test_num_models(self, n):
        with self.assertRaisesRegex(ValueError, "num_models must be an integer >= 1"):
            make_trainer(n)

    def test_different_architectures(self):
        units = iter([3, 4])
        message = r"Model 1 .* has shape \(64, 3\) in the model but .* \(64, 4\) in the peer"
        with self.assertRaisesRegex(ValueError, message):
            make_trainer(2, model_fn=lambda: build_model(units=next(units)))

    def test_model_instance_instead_of_a_function(self):
        model = build_model()
        with self.assertRaisesRegex(TypeError, r"model_fn must be a function that builds a model, got a Model "
                                               r"\('.*'\).*lambda"):
            make_trainer(2, model_fn=model)
        with self.assertRaisesRegex(TypeError, "model_fn must be a function that builds a model, got 'resnet'"):
            make_trainer(2, model_fn="resnet")

    @parameterized.named_parameters(
        ("num_models", dict(num_models="2"), TypeError, "num_models must be an integer >= 1, got '2'"),
        ("metrics", dict(metrics="accuracy"), TypeError, "metrics must be a list.*got 'accuracy'"),
        ("lr_spread", dict(lr_spread="yes"), TypeError, "lr_spread must be True or False, got 'yes'"),
        ("seed", dict(seed=1.5), ValueError, "seed must be an integer, got 1.5"),
        ("backup_dir", dict(backup_dir=3), TypeError, "backup_dir must be a path.*got 3"),
        ("distillation", dict(distillation="teacher.keras"), TypeError,
         "distillation must be None or a keras_graft.Distillation, got 'teacher.keras'"),
        ("steps_per_execution", dict(steps_per_execution="4"), TypeError, "steps_per_execution must be an integer"),
        ("grafting_a", dict(grafting={"a": "0.4"}), TypeError, "a must be a number, got '0.4'"),
    )
    def test_arguments_are_named(self, kwargs, error, message):
        with self.assertRaisesRegex(error, message):
            make_trainer(**kwargs)

    def test_same_model_object_twice(self):
        model = build_model()
        with self.assertRaisesRegex(ValueError, "same model object twice"):
            make_trainer(2, model_fn=lambda: model)

    def test_unbuilt_model(self):
        with self.assertRaisesRegex(ValueError, "not built"):
            make_trainer(2, model_fn=lambda: keras.Sequential([keras.layers.Dense(3)]))

    def test_grafting_settings(self):
        with self.assertRaisesRegex(ValueError, "at least 2 models"):
            make_trainer(1, grafting=Grafting())
        with self.assertRaisesRegex(ValueError, "peers=None"):
            make_trainer(2, grafting=Grafting(peers=build_model()))
        with self.assertRaisesRegex(TypeError, "grafting must be"):
            make_trainer(2, grafting="ring")
        with self.assertRaisesRegex(ValueError, "level"):
            make_trainer(2, grafting={"level": "channel"})

    def test_optimizer_and_schedule_options(self):
        with self.assertRaisesRegex(ValueError, "set each model's learning rate in the factory"):
            make_trainer(2, optimizer=lambda k: keras.optimizers.SGD(0.1), lr_spread=True)
        with self.assertRaisesRegex(TypeError, "not a Keras optimizer"):
            make_trainer(2, optimizer=lambda k: "sgd")
        with self.assertRaisesRegex(ValueError, "lr_schedule must be"):
            make_trainer(2, lr_schedule="linear")
        with self.assertRaisesRegex(ValueError, "data_order"):
            make_trainer(2, data_order="random")
        with self.assertRaisesRegex(ValueError, "Unknown strategy"):
            make_trainer(2, strategy="tpu")
        with self.assertRaisesRegex(ValueError, "needs a loss"):
            make_trainer(2, loss=None)
        trainer = make_trainer(2, optimizer=lambda k: keras.optimizers.Adam(1e-3 * (k + 1)))
        self.assertAllClose([float(o.learning_rate.numpy()) for o in trainer.optimizers], [1e-3, 2e-3])

    def test_backup_dir_that_is_a_file_fails_before_training(self):
        path = os.path.join(self.get_temp_dir(), "a_file")
        with open(path, "w") as f:
            f.write("not a directory")
        with self.assertRaisesRegex(ValueError, r"backup_dir .*a_file' is a file, not a directory"):
            make_trainer(2, backup_dir=path)
        with self.assertRaisesRegex(ValueError, r"backup_dir .* cannot be created"):
            make_trainer(2, backup_dir=os.path.join(path, "below"))
        with self.assertRaisesRegex(ValueError, "max_loss_ratio must be"):
            make_trainer(2, max_loss_ratio=0.5)

    def test_element_shape_does_not_fit(self):
        trainer = make_trainer(2)
        x = np.zeros((16, 5, 5, 2), "float32")
        with self.assertRaisesRegex(ValueError, r"train_data does not fit the models.*\(None, 6, 6, 2\)"):
            trainer.fit((x, np.zeros(16)), batch_size=8)
        with self.assertRaisesRegex(ValueError, "must be \\(x, y\\) pairs"):
            trainer.fit(tf.data.Dataset.from_tensor_slices(np.zeros((16, 6, 6, 2), "float32")), batch_size=8)

    def test_batching_errors(self):
        x, y = tiny_data(16)
        trainer = make_trainer(2)
        with self.assertRaisesRegex(ValueError, "already batched"):
            trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), batch_size=4)
        with self.assertRaisesRegex(ValueError, "positive integer batch_size"):
            trainer.fit((x, y))
        with self.assertRaisesRegex(ValueError, "give 2 batches"):
            trainer.fit((x, y), batch_size=8, steps_per_epoch=3)
        with self.assertRaisesRegex(ValueError, "infinite"):
            trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).repeat(), batch_size=8)
        with self.assertRaisesRegex(ValueError, "different numbers of examples"):
            trainer.fit((x, y[:3]), batch_size=8)

    def test_batch_size_not_divisible_by_replicas(self):
        x, y = tiny_data(16)
        trainer = make_trainer(2, strategy=testing_utils.mirrored_strategy())
        with self.assertRaisesRegex(ValueError, "not divisible by the 2 replicas"):
            trainer.fit((x, y), batch_size=7)

    @parameterized.named_parameters(
        ("array", lambda x, y: x, TypeError, "validation_data must be a tf.data.Dataset"),
        ("triple", lambda x, y: (x, y, y), TypeError, "validation_data must be a tf.data.Dataset"),
        ("string", lambda x, y: "test", TypeError, "validation_data must be a tf.data.Dataset"),
        ("shape", lambda x, y: (x[:, :5], y), ValueError, "validation_data does not fit the models"),
        ("x_only", lambda x, y: tf.data.Dataset.from_tensor_slices(x), ValueError, "validation_data does not fit"),
    )
    def test_validation_data_of_the_wrong_kind(self, make, error, message):
        x, y = tiny_data(16)
        trainer = make_trainer(2)
        with self.assertRaisesRegex(error, message):
            trainer.fit((x, y), batch_size=8, validation_data=make(x, y))
        self.assertEqual(int(trainer.optimizers[0].iterations.numpy()), 0)  # Nothing trained before the error.

    def test_trainer_imports_neither_callbacks_nor_reactivation(self):
        import ast
        from keras_graft import trainer as trainer_module

        with open(trainer_module.__file__) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        self.assertIn("keras_graft.rounds", imported)
        for module in ("keras_graft.callbacks", "keras_graft.reactivation"):
            self.assertNotIn(module, imported)

    def test_grafting_callback_in_callbacks(self):
        x, y = tiny_data(16)
        with self.assertRaisesRegex(ValueError, "GraftTrainer\\(grafting=Grafting"):
            make_trainer(2).fit((x, y), batch_size=8, callbacks=[Grafting()])


class StrategiesTest(tf.test.TestCase):

    def test_names(self):
        self.assertIs(strategies.get(None), tf.distribute.get_strategy())
        self.assertIs(strategies.get("default"), tf.distribute.get_strategy())
        mirrored = testing_utils.mirrored_strategy()
        self.assertIs(strategies.get(mirrored), mirrored)
        self.assertLen(strategies.local_devices(), 2)  # conftest splits the CPU in two.
        self.assertFalse(strategies.is_multi_worker(mirrored))
        with self.assertRaisesRegex(ValueError, "Unknown strategy"):
            strategies.get("tpu")


if __name__ == "__main__":
    tf.test.main()
