"""PeerEnsemble trained by Keras' own compile/fit: per-peer training, logs, grafting, callbacks, strategies, saving."""
import csv
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from tensorflow.python.framework import config as tf_config

import keras_graft
from keras_graft import reactivation, schedules
from keras_graft.trainer import PeerEnsemble as PeerEnsembleFromTrainer

import testing_utils
from test_trainer import LOGITS_LOSS, build_model, max_difference, tiny_data

def make_peers(n=2, seed=1, batch_norm=False, strategy="default", **compile_kwargs):
    """N tiny peers in a compiled PeerEnsemble, created in the strategy's scope."""
    keras.utils.set_random_seed(seed)
    with testing_utils.strategy(strategy).scope():
        peers = keras_graft.PeerEnsemble([build_model(batch_norm=batch_norm) for _ in range(n)])
        compile_kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1, momentum=0.9))
        peers.compile(loss=LOGITS_LOSS, metrics=["accuracy"], **compile_kwargs)
    return peers


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class OnEpochBegin(keras.callbacks.Callback):
    """Records the peers' weights when each epoch begins (placed after Grafting: after its round)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_begin(self, epoch, logs=None):
        self.weights.append([[w.numpy() for w in peer.weights] for peer in self.model.peers])


class StopAfter(keras.callbacks.Callback):
    """Interrupts fit after epoch ``epoch`` has ended (and been backed up), as a kill would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class TrainingTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_each_peer_trains_as_keras_would_train_it_alone(self, strategy):
        """One fit of the ensemble = one Keras fit per peer, each with its own optimizer and learning rate."""
        x, y = tiny_data(32)
        peers = make_peers(2, strategy=strategy, lr_spread=True)
        alone = []
        for peer, rate in zip(peers.peers, schedules.spread_learning_rates(0.1, 2)):
            model = build_model()
            model.set_weights(peer.get_weights())
            model.compile(optimizer=keras.optimizers.SGD(rate, momentum=0.9), loss=LOGITS_LOSS)
            model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            alone.append(model)
        history = peers.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        for peer, model in zip(peers.peers, alone):
            self.assertLess(max_difference(peer.get_weights(), model.get_weights()), 1e-5)
        self.assertEqual(int(peers.optimizer.iterations.numpy()), 8)
        self.assertEqual([int(o.iterations.numpy()) for o in peers.peer_optimizers], [8, 8])
        self.assertAllClose(history.history["loss"], np.mean([history.history["loss_0"],
                                                               history.history["loss_1"]], axis=0))

    def test_compiled_optimizer_holds_no_slots(self):
        peers = make_peers(2)
        self.assertLen(peers.optimizer.variables, 2)  # iterations and learning rate: no momentum for 2 models
        for peer, optimizer in zip(peers.peers, peers.peer_optimizers):
            self.assertLen(optimizer.variables, 2 + len(peer.trainable_variables))

    def test_logs_evaluate_and_predict_match_numpy(self):
        x, y = tiny_data(24)
        peers = make_peers(2)
        history = peers.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0)
        for key in ("loss", "accuracy", "loss_0", "accuracy_1", "accuracy_ensemble", "loss_ensemble",
                    "val_loss_1", "val_accuracy", "val_accuracy_ensemble"):
            self.assertIn(key, history.history)
        results = peers.evaluate(x, y, batch_size=10, verbose=0, return_dict=True)
        logits = [peer(x).numpy() for peer in peers.peers]
        for k, (peer, z) in enumerate(zip(peers.peers, logits)):
            expected = float(LOGITS_LOSS(y, z)) + float(sum(peer.losses))
            self.assertAllClose(results[f"loss_{k}"], expected, atol=1e-5)
            self.assertAllClose(results[f"accuracy_{k}"], np.mean(np.argmax(z, -1) == y))
        probabilities = np.mean([softmax(z) for z in logits], axis=0)
        self.assertAllClose(results["accuracy_ensemble"], np.mean(np.argmax(probabilities, -1) == y))
        self.assertAllClose(results["loss_ensemble"], np.mean(-np.log(probabilities[np.arange(24), y])), atol=1e-5)
        self.assertAllClose(results["loss"], (results["loss_0"] + results["loss_1"]) / 2)
        self.assertAllClose(peers.predict(x, verbose=0), probabilities, atol=1e-6)
        ordered = peers.evaluate(x, y, verbose=0)
        self.assertAllClose(ordered[:2], [results["loss"], results["accuracy"]])
        self.assertAllClose(history.history["val_accuracy_ensemble"], [results["accuracy_ensemble"]])

    def test_a_diverged_peer_is_left_out_of_the_ensemble(self):
        x, y = tiny_data(24)
        peers = make_peers(2)
        peers.fit(x, y, batch_size=8, epochs=1, verbose=0)
        healthy_probabilities = softmax(peers.peers[0](x).numpy())
        peers.peers[1].set_weights([np.full_like(w, np.nan) for w in peers.peers[1].get_weights()])
        self.assertAllClose(peers.predict(x, verbose=0), healthy_probabilities, atol=1e-6)
        results = peers.evaluate(x, y, verbose=0, return_dict=True)
        self.assertTrue(np.isnan(results["loss_1"]))
        self.assertAllClose(results["loss_ensemble"], np.mean(-np.log(healthy_probabilities[np.arange(24), y])),
                            atol=1e-5)
        self.assertAllClose(results["accuracy_ensemble"], np.mean(np.argmax(healthy_probabilities, -1) == y))

    def test_sample_weight_weights_the_loss(self):
        x, y = tiny_data(16)
        peers = make_peers(2)
        weights = np.linspace(0.0, 2.0, 16).astype("float32")
        results = peers.evaluate(x, y, sample_weight=weights, batch_size=16, verbose=0, return_dict=True)
        z = peers.peers[0](x).numpy()
        nll = -np.log(softmax(z)[np.arange(16), y])
        expected = np.sum(weights * nll) / 16 + float(sum(peers.peers[0].losses))
        self.assertAllClose(results["loss_0"], expected, atol=1e-5)

    def test_spread_of_a_scheduled_learning_rate(self):
        schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
        peers = make_peers(4, optimizer=keras.optimizers.SGD(schedule), lr_spread=True)
        factors = schedules.spread_learning_rates(1.0, 4)
        for optimizer, factor in zip(peers.peer_optimizers, factors):
            self.assertAllClose(float(optimizer.learning_rate), 0.1 * factor)
            optimizer.iterations.assign(4)
            self.assertAllClose(float(optimizer.learning_rate), 0.1 * 0.25 * factor)
        scaled = keras.optimizers.schedules.deserialize(peers.peer_optimizers[0].get_config()["learning_rate"])
        self.assertIsInstance(scaled, schedules.Scaled)
        self.assertAllClose(float(scaled(4)), 0.1 * 0.25 * factors[0])

    def test_distillation_logs_terms(self):
        x, y = tiny_data(16)
        keras.utils.set_random_seed(9)
        teacher = build_model()
        peers = make_peers(2, distillation=keras_graft.Distillation([teacher], temperature=2.0, mutual=True))
        history = peers.fit(x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0)
        h = history.history
        regularization = [float(sum(peer.losses)) for peer in peers.peers]
        self.assertGreater(h["distill_loss_0"][0], 0.0)
        self.assertIn("val_task_loss_1", h)
        results = peers.evaluate(x, y, verbose=0, return_dict=True)
        self.assertAllClose(results["loss_1"], results["task_loss_1"] + results["distill_loss_1"] + regularization[1],
                            rtol=1e-5)
        self.assertAllClose(results["distill_loss"], (results["distill_loss_0"] + results["distill_loss_1"]) / 2)

    def test_steps_per_execution_gives_the_same_run(self):
        x, y = tiny_data(40)
        runs = []
        for steps_per_execution in (1, 2):
            peers = make_peers(2, steps_per_execution=steps_per_execution)
            history = peers.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                                callbacks=[keras_graft.Grafting()])
            runs.append((peers.get_weights(), history.history["loss"], history.history["graft_layers"]))
        self.assertLess(max_difference(runs[0][0], runs[1][0]), 1e-6)
        self.assertAllClose(runs[0][1], runs[1][1], rtol=1e-6)
        self.assertEqual(runs[0][2], runs[1][2])

    def test_jit_compile(self):
        x, y = tiny_data(16)
        weights = []
        # Keras turns XLA off while ops are deterministic (conftest sets TF_DETERMINISTIC_OPS).
        tf_config.disable_op_determinism()
        try:
            for jit_compile in (False, True):
                peers = make_peers(2, jit_compile=jit_compile)
                self.assertEqual(peers.jit_compile, jit_compile)
                peers.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
                weights.append(peers.get_weights())
        finally:
            tf.config.experimental.enable_op_determinism()
        self.assertLess(max_difference(*weights), 1e-5)

    def test_bad_input(self):
        with self.assertRaisesRegex(TypeError, "non-empty list of Keras models"):
            keras_graft.PeerEnsemble([])
        with self.assertRaisesRegex(TypeError, "Keras models"):
            keras_graft.PeerEnsemble(["model"])
        with self.assertRaisesRegex(ValueError, "output_activation"):
            keras_graft.PeerEnsemble([build_model()], output_activation="relu")
        peers = keras_graft.PeerEnsemble([build_model(), build_model()])
        with self.assertRaisesRegex(ValueError, "needs a loss"):
            peers.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "loss_weights"):
            peers.compile(optimizer="sgd", loss=LOGITS_LOSS, loss_weights=[1.0])
        unbuilt = keras_graft.PeerEnsemble([keras.Sequential([keras.layers.Dense(3)])])
        with self.assertRaisesRegex(ValueError, "not built"):
            unbuilt.compile(optimizer="sgd", loss=LOGITS_LOSS)

    def test_repr_acts_on_each_peer_with_its_optimizer(self):
        def two_conv_peers():  # RePr never prunes the first convolution, so it needs two
            peers = keras_graft.PeerEnsemble([keras.Sequential(
                [keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, padding="same"), keras.layers.ReLU(),
                 keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3)]) for _ in range(2)])
            peers.compile(optimizer="sgd", loss=LOGITS_LOSS)
            return peers

        peers = two_conv_peers()
        callback = keras_graft.RePr(s1=1, s2=1, cycles=1, seed=3)
        callback.set_model(peers)
        targets = callback._targets()
        self.assertEqual([m for m, _ in targets], list(peers.peers))
        self.assertEqual([o for _, o in targets], list(peers.peer_optimizers))
        # Each peer has a state, numbered as if the user had set the peers; the ensemble wrapper has none.
        self.assertFalse(hasattr(peers, reactivation.STATE_ATTRIBUTE))
        by_hand = keras_graft.RePr(s1=1, s2=1, cycles=1, seed=3)
        by_hand.models = two_conv_peers().peers
        for peer, other in zip(peers.peers, by_hand.models):
            self.assertEqual(int(callback.state_for(peer).seed.numpy()), int(by_hand.state_for(other).seed.numpy()))

    def test_importable_from_the_trainer_module(self):
        self.assertIs(PeerEnsembleFromTrainer, keras_graft.PeerEnsemble)


class GraftingTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_ring_graft_and_logged_validation_is_what_fit_returns(self, strategy):
        x, y = tiny_data(32)
        peers = make_peers(2, strategy=strategy, batch_norm=True, lr_spread=True)
        record = OnEpochBegin()
        history = peers.fit(x, y, batch_size=8, epochs=3, validation_data=(x, y), verbose=0,
                            callbacks=[keras_graft.Grafting(), record])
        # The round after epoch e opens epoch e + 1; with N = 2 both peers leave it equal.
        self.assertGreater(max_difference(*record.weights[0]), 1e-3)
        for epoch in (1, 2):
            self.assertLess(max_difference(*record.weights[epoch]), 1e-6)
        self.assertGreater(max_difference(*[p.get_weights() for p in peers.peers]), 1e-4)  # no final round
        self.assertEqual(history.history["graft_layers"], [0, 4, 4])
        self.assertEqual(history.history["nonfinite_models"], [0, 0, 0])
        alphas = [history.history[f"graft_alpha_{k}"][1] for k in range(2)]
        self.assertAllClose(sum(alphas), 1.0, atol=1e-6)
        results = peers.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
        for key in ("loss", "loss_0", "accuracy_1", "accuracy_ensemble", "loss_ensemble"):
            self.assertAllClose(history.history[f"val_{key}"][-1], results[key], rtol=1e-6)

    def test_scion_grafts_each_peer_from_its_own_copy(self):
        x, y = tiny_data(16)
        peers = make_peers(2, optimizer=keras.optimizers.SGD(0.0))  # only the scion changes the weights
        record = OnEpochBegin()
        scion = keras_graft.NoiseScion(threshold=1e3, seed=0)  # every filter is invalid: all take noise
        history = peers.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[keras_graft.Grafting(scion), record])
        self.assertEqual(history.history["scion_filters_1"], [0, 4])
        self.assertEqual(history.history["scion_filters"], [0, 8])
        self.assertEqual(history.history["graft_alpha_0"], [1.0, 1.0])
        changes = []
        for k in range(2):
            copy = build_model()
            copy.set_weights(record.weights[0][k])
            scion.for_member(k).apply(copy, 0)  # round 0: the round after epoch 0
            for expected, actual in zip(copy.get_weights(), record.weights[1][k]):
                self.assertAllEqual(expected, actual)
            changes.append(record.weights[1][k][0] - record.weights[0][k][0])
        self.assertNotAllClose(changes[0], changes[1])

    def test_nonfinite_peer_is_not_mixed_in(self):
        x, y = tiny_data(16)
        peers = make_peers(2)
        peers.peers[1].layers[-1].bias.assign(np.full((3,), np.nan, np.float32))
        history = peers.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[keras_graft.Grafting()])
        self.assertEqual(history.history["nonfinite_models"], [1, 1])
        self.assertGreater(history.history["graft_skipped_layers_0"][1], 0)
        self.assertTrue(all(np.isfinite(w).all() for w in peers.peers[0].get_weights()))

    def test_grafting_needs_peers_or_an_ensemble(self):
        x, y = tiny_data(16)
        model = build_model()
        model.compile(optimizer="sgd", loss=LOGITS_LOSS)
        with self.assertRaisesRegex(ValueError, "fit a keras_graft.PeerEnsemble"):
            model.fit(x, y, epochs=1, verbose=0, callbacks=[keras_graft.Grafting()])
        single = make_peers(1)
        with self.assertRaisesRegex(ValueError, "at least 2 peers"):
            single.fit(x, y, epochs=1, verbose=0, callbacks=[keras_graft.Grafting()])


class CallbacksAndSavingTest(tf.test.TestCase, parameterized.TestCase):

    def test_keras_callbacks(self):
        x, y = tiny_data(32)
        tmp = self.get_temp_dir()
        csv_path = os.path.join(tmp, "log.csv")
        weights_path = os.path.join(tmp, "best.weights.h5")
        first_epoch = []
        record = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: epoch or first_epoch.extend(peers.get_weights()))
        # No accuracy improves by 1: EarlyStopping stops after epoch 2 and restores all peers from epoch 1.
        early = keras.callbacks.EarlyStopping(monitor="val_accuracy_ensemble", mode="max", min_delta=1.0,
                                              patience=0, restore_best_weights=True)
        checkpoint = keras.callbacks.ModelCheckpoint(weights_path, monitor="val_loss", save_weights_only=True,
                                                     save_best_only=True)
        callbacks = [keras_graft.Grafting(), record, early, checkpoint, keras.callbacks.CSVLogger(csv_path)]
        board = os.path.join(tmp, "board")
        try:
            import tensorboard  # noqa: F401
            callbacks.append(keras.callbacks.TensorBoard(board, update_freq="batch"))
        except ImportError:
            board = None
        peers = make_peers(2)
        history = peers.fit(x, y, batch_size=8, epochs=5, validation_data=(x, y), verbose=1, callbacks=callbacks)
        self.assertIsInstance(history, keras.callbacks.History)
        self.assertEqual(history.epoch, [0, 1])
        self.assertLess(max_difference(peers.get_weights(), first_epoch), 1e-7)
        with open(csv_path) as handle:
            rows = list(csv.DictReader(handle))
        self.assertLen(rows, 2)
        for key in ("loss_0", "val_accuracy_ensemble", "graft_alpha", "graft_alpha_1"):
            self.assertAllClose(float(rows[1][key]), history.history[key][1])
        make_peers(2, seed=5).load_weights(weights_path)  # every peer and its optimizer's slots
        if board is not None:
            self.assertNotEmpty(os.listdir(os.path.join(board, "train")))

    def test_backup_and_restore_resumes_exactly(self):
        x, y = tiny_data(32)
        backup = os.path.join(self.get_temp_dir(), "backup")

        def run(stop_after=None):
            peers = make_peers(2, seed=3, batch_norm=True, lr_spread=True)
            halve_at_epoch_1 = keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr / 2 if epoch == 1 else lr)
            callbacks = [keras_graft.Grafting(), keras.callbacks.BackupAndRestore(backup), halve_at_epoch_1]
            if stop_after is not None:
                callbacks.append(StopAfter(stop_after))
            history = peers.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
            return peers, history

        uninterrupted, _ = run()
        with self.assertRaises(KeyboardInterrupt):
            run(stop_after=1)
        resumed, history = run()
        self.assertEqual(history.epoch, [2])
        self.assertEqual(history.history["graft_layers"], [4])  # the pending round, grafted once
        self.assertLess(max_difference(uninterrupted.get_weights(), resumed.get_weights()), 1e-6)
        for a, b in zip(uninterrupted.peer_optimizers, resumed.peer_optimizers):
            self.assertLess(max_difference([v.numpy() for v in a.variables], [v.numpy() for v in b.variables]),
                            1e-6)
        self.assertAllClose([float(o.learning_rate.numpy()) for o in resumed.peer_optimizers], [0.025, 0.05])

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_learning_rate_callbacks_reach_every_peer(self, strategy):
        """Keras' callbacks set the compiled optimizer's rate; every peer follows, keeping lr_spread's ratios."""
        x, y = tiny_data(32)
        peers = make_peers(2, strategy=strategy, optimizer=keras.optimizers.SGD(0.1), lr_spread=True)
        record = OnEpochBegin()
        rates = []
        remember_rates = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: rates.append(
            [float(o.learning_rate.numpy()) for o in peers.peer_optimizers]))
        # The rate drops to 0 for epoch 2 and comes back for epoch 3 (LearningRateScheduler's epochs are 0-based).
        schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: {1: 0.0, 2: 0.1}.get(epoch, lr))
        history = peers.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[schedule, record, remember_rates])
        self.assertAllClose(rates, [[0.05, 0.1], [0.0, 0.0], [0.05, 0.1]])
        self.assertAllClose(history.history["learning_rate"], [0.1, 0.0, 0.1])
        # Epoch 2 trained at rate 0: the weights it began with are the ones epoch 3 began with.
        began = [[w for peer in weights for w in peer] for weights in record.weights]
        self.assertEqual(max_difference(began[1], began[2]), 0.0)
        self.assertGreater(max_difference(began[0], began[1]), 1e-4)

        plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=100.0)
        rates.clear()
        peers.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[plateau, remember_rates])
        # No improvement of 100 after the first epoch: the rate halves after epoch 2, and epoch 3 trains with it.
        self.assertAllClose(rates, [[0.05, 0.1], [0.05, 0.1], [0.025, 0.05]])

    def test_save_and_load_model(self):
        x, y = tiny_data(16)
        peers = make_peers(2, lr_spread=True)
        peers.fit(x, y, batch_size=8, epochs=1, verbose=0)
        path = os.path.join(self.get_temp_dir(), "peers.keras")
        peers.save(path)
        loaded = keras.saving.load_model(path)
        self.assertIsInstance(loaded, keras_graft.PeerEnsemble)
        self.assertEqual(loaded.output_activation, "softmax")
        self.assertAllClose(loaded.predict(x, verbose=0), peers.predict(x, verbose=0), atol=1e-6)
        self.assertAllClose([float(o.learning_rate) for o in loaded.peer_optimizers], [0.05, 0.1])
        for a, b in zip(peers.peer_optimizers, loaded.peer_optimizers):
            self.assertLess(max_difference([v.numpy() for v in a.variables], [v.numpy() for v in b.variables]),
                            1e-7)
        self.assertAllClose(loaded.evaluate(x, y, verbose=0), peers.evaluate(x, y, verbose=0), atol=1e-6)
        loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
        clone = keras_graft.PeerEnsemble.from_config(peers.get_config())
        self.assertLen(clone.peers, 2)


if __name__ == "__main__":
    tf.test.main()
