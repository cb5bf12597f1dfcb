"""RePr: overlap score, ranking, schedule, held-at-zero filters, orthogonal re-initialisation, distribution,
state in checkpoints."""

import os

import contextlib
import functools
import io

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from absl.testing import parameterized

from keras_graft import criteria, layouts
from keras_graft import reactivation
from keras_graft.reactivation import RePr, optimizer_slots, phase_at, select_filters

import testing_utils

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def np_rows(kernel, axes):
    """Filters as rows, written independently of the library: filter axes moved last, then flattened."""
    axes = sorted(a % kernel.ndim for a in axes)
    other = [i for i in range(kernel.ndim) if i not in axes]
    moved = np.transpose(kernel, other + axes)
    return moved.reshape(-1, int(np.prod([kernel.shape[a] for a in axes]))).T


def np_overlap(kernel, axes=(-1,)):
    """RePr's score: rows normalised, P = |W W^T - I|, score_f = sum_j P[f, j] / J."""
    rows = np_rows(np.asarray(kernel, np.float64), axes)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    overlap = np.abs(unit @ unit.T - np.eye(len(rows)))
    return overlap.sum(axis=1) / len(rows)


def unit_rows(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def conv_net(filters=(4, 8, 8), kernel_sizes=(3, 3, 3), bn=True, seed=0, channels=3):
    """conv -> [BN] -> tanh, for each conv, then global pooling and a dense head; convs named c0, c1, ...

    tanh, not ReLU: ReLU's zero gradient at 0 would keep a zeroed filter at zero by itself, hiding a missing hold.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, channels))
    x = inputs
    for i, (count, size) in enumerate(zip(filters, kernel_sizes)):
        x = keras.layers.Conv2D(count, size, padding="same", name=f"c{i}")(x)
        if bn:
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation("tanh")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


def compiled(model, optimizer="sgd"):
    optimizers = {"sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9), "adam": lambda: keras.optimizers.Adam(0.01)}
    model.compile(optimizer=optimizers[optimizer](), loss=LOSS)
    return model


def data(n=16, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, channels)).astype(np.float32), np.arange(n) % 3


def dropped_variables(model, layer, bn=None, slots=True, optimizer=None):
    """[(path, variable, filter axes)] of the weights that carry ``layer``'s filters (its kernel, bias and the
    following BN's gamma and beta, ``bn`` or "bn<i>" for "c<i>") and, with ``slots``, of their optimizer slots."""
    conv = model.get_layer(layer)
    norm = model.get_layer(bn or "bn" + layer[1:])
    kernel, axes = layouts.primary_kernel(conv)
    variables = [(kernel, axes), (conv.bias, (-1,)), (norm.gamma, (-1,)), (norm.beta, (-1,))]
    optimizer = optimizer or getattr(model, "optimizer", None)
    return [(v.path, slot, a) for v, a in variables
            for slot in [v] + (optimizer_slots(optimizer, v) if slots else [])]


def assert_filters_zero(test, model, indices, bn_names=None, slots=True, optimizer=None, weights=True):
    """The dropped filters' weights (with ``weights``) and optimizer slots (with ``slots``) are exactly zero."""
    for layer, dropped in indices.items():
        for path, variable, axes in dropped_variables(model, layer, (bn_names or {}).get(layer), slots, optimizer):
            if not weights and variable.path == path:
                continue
            rows = np_rows(variable.numpy(), axes)[dropped]
            test.assertAllEqual(rows, np.zeros_like(rows), msg=f"{path} of a dropped filter")


class Recorder(keras.callbacks.Callback):
    """Records each epoch's kernels (place it before RePr to see them before a drop or re-initialisation)."""

    def __init__(self, repr_callback, layers):
        super().__init__()
        self.repr = repr_callback
        self.layers = layers
        self.kernels = []
        self.phases = []

    def on_train_batch_end(self, batch, logs=None):
        self.phases.append(self.repr.state_of()[0])

    def on_epoch_end(self, epoch, logs=None):
        self.kernels.append({name: self.model.get_layer(name).kernel.numpy() for name in self.layers})


class HeldAtZero(keras.callbacks.Callback):
    """Placed after RePr: when a pruned epoch begins, the dropped filters' weights and optimizer slots are exactly
    zero; after every step of S2, their weights are (the slots may accumulate: nothing lets them move a weight)."""

    def __init__(self, test, repr_callback, bn_names=None):
        super().__init__()
        self.test = test
        self.repr = repr_callback
        self.bn_names = bn_names
        self.checked_steps = 0
        self.checked_drops = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.repr.state_of()[0] == "pruned" and self.repr.history[-1]["unit"] == epoch:
            assert_filters_zero(self.test, self.model, self.repr.history[-1]["indices"], self.bn_names)
            self.checked_drops += 1

    def on_train_batch_end(self, batch, logs=None):
        if self.repr.state_of()[0] == "pruned":
            assert_filters_zero(self.test, self.model, self.repr.history[-1]["indices"], self.bn_names, slots=False)
            self.checked_steps += 1


class ScoreTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("conv2d", (3, 3, 4, 6), (-1,)),
        ("depthwise", (3, 3, 4, 2), (-2, -1)),
        ("transpose", (3, 3, 5, 4), (-2,)),
    )
    def test_orthogonality_matches_numpy(self, shape, axes):
        kernel = np.random.default_rng(1).normal(size=shape).astype(np.float32)
        self.assertAllClose(criteria.orthogonality(kernel, filter_axes=axes), np_overlap(kernel, axes), atol=1e-6)

    def test_orthogonal_filters_score_zero_and_copies_score_high(self):
        eye = np.eye(4, dtype=np.float32).reshape(1, 1, 4, 4)
        self.assertAllClose(criteria.orthogonality(eye), np.zeros(4))
        copies = np.ones((1, 1, 4, 3), np.float32)
        self.assertAllClose(criteria.orthogonality(copies), np.full(3, 2 / 3))

    @parameterized.parameters(((3, 3, 4, 6), (-1,)), ((3, 3, 4, 2), (-2, -1)), ((3, 3, 5, 4), (-2,)))
    def test_rows_round_trip_and_match_filter_rows(self, shape, axes):
        kernel = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        rows = layouts.to_rows(kernel, axes)
        self.assertAllEqual(rows, criteria.filter_rows(kernel, axes))
        self.assertAllEqual(rows, np_rows(kernel, axes))
        self.assertAllEqual(layouts.from_rows(rows, shape, axes), kernel)


class ScheduleTest(tf.test.TestCase, parameterized.TestCase):

    def test_verbose_prints_one_line_per_event(self):
        absl_logger = logging.get_absl_logger()
        level = absl_logger.level  # NOTSET (inherit) unless set: restore exactly that
        absl_logger.setLevel("WARNING")  # printing must not need absl logging at INFO
        try:
            lines = {}
            for verbose in (0, 1):
                model = compiled(conv_net())
                output = io.StringIO()
                with contextlib.redirect_stdout(output):
                    model.fit(*data(), batch_size=8, epochs=3, verbose=0,
                              callbacks=[RePr(s1=1, s2=1, prune_ratio=0.25, cycles=1, verbose=verbose)])
                lines[verbose] = [line for line in output.getvalue().splitlines() if "RePr" in line]
        finally:
            absl_logger.setLevel(level)
        self.assertEqual(lines[0], [])
        self.assertLen(lines[1], 2)
        self.assertRegex(lines[1][0], r"^RePr '.*' cycle 1: dropped 4 filters after 1 epochs \{")
        self.assertRegex(lines[1][1], r"^RePr '.*' cycle 1: re-initialised 4 filters after 2 epochs \{")

    def test_phase_at(self):
        expected = ["full"] * 2 + ["pruned"] * 3 + ["full"] * 2 + ["pruned"] * 3 + ["done"] * 3
        got = [reactivation.PHASES[phase_at(t, 2, 3, 2)[0]] for t in range(13)]
        self.assertEqual(got, expected)
        self.assertEqual([phase_at(t, 2, 3, 2)[1] for t in range(13)], [1] * 5 + [2] * 8)

    def test_epoch_schedule_and_logs(self):
        model = compiled(conv_net())
        repr_callback = RePr(s1=2, s2=1, prune_ratio=0.25, cycles=2)
        history = model.fit(*data(), batch_size=8, epochs=7, verbose=0, callbacks=[repr_callback])
        self.assertEqual(history.history["repr_phase"], [0, 0, 1, 0, 0, 1, 2])
        self.assertEqual(history.history["repr_cycle"], [1, 1, 1, 2, 2, 2, 2])
        self.assertEqual(history.history["repr_dropped"], [0, 0, 4, 0, 0, 4, 0])  # round(0.25 * 16)
        self.assertEqual(history.history["repr_fallbacks"], [0] * 7)
        events = [(e["event"], e["cycle"], e["unit"]) for e in repr_callback.history]
        self.assertEqual(events, [("drop", 1, 2), ("reinit", 1, 3), ("drop", 2, 5), ("reinit", 2, 6)])
        self.assertEqual(repr_callback.state_of(), ("done", 2, 0))

    def test_step_schedule(self):
        model = compiled(conv_net())
        repr_callback = RePr(s1=3, s2=2, prune_ratio=0.25, cycles=2, unit="step")
        recorder = Recorder(repr_callback, [])
        model.fit(*data(), batch_size=8, epochs=6, verbose=0, callbacks=[recorder, repr_callback])  # 12 steps
        expected = [reactivation.PHASES[phase_at(t, 3, 2, 2)[0]] for t in range(12)]
        self.assertEqual(recorder.phases, expected)
        self.assertEqual([(e["event"], e["unit"]) for e in repr_callback.history],
                         [("drop", 3), ("reinit", 5), ("drop", 8), ("reinit", 10)])

    def test_fit_calls_continue_the_schedule(self):
        model = compiled(conv_net())
        repr_callback = RePr(s1=1, s2=1, cycles=1)
        phases = [model.fit(*data(), batch_size=8, epochs=1, verbose=0, callbacks=[repr_callback])
                  .history["repr_phase"][0] for _ in range(3)]
        self.assertEqual(phases, [0, 1, 2])


class RankingTest(tf.test.TestCase, parameterized.TestCase):

    def test_global_ranking_drops_highest_scores(self):
        scores = [np.array([0.1, 0.9, 0.5]), np.array([0.8, 0.2, 0.7, 0.3])]
        chosen = select_filters(scores, 3 / 7)
        self.assertEqual([c.tolist() for c in chosen], [[1], [0, 2]])
        chosen = select_filters(scores, 3 / 7, higher_is_better=True)
        self.assertEqual([c.tolist() for c in chosen], [[0], [1, 3]])

    def test_never_drops_a_whole_layer(self):
        scores = [np.array([5.0, 6.0]), np.array([0.1, 0.2, 0.3])]
        chosen = select_filters(scores, 0.6)
        self.assertEqual([c.tolist() for c in chosen], [[1], [1, 2]])
        chosen = select_filters(scores, 0.99)  # capped at every layer less one filter
        self.assertEqual([len(c) for c in chosen], [1, 2])

    def test_at_least_one_filter(self):
        self.assertEqual([c.tolist() for c in select_filters([np.array([0.1, 0.3])], 0.01)], [[1]])

    @parameterized.parameters("orthogonality", "l1")
    def test_fit_drops_the_criterion_worst_never_the_first_conv_or_a_whole_layer(self, criterion):
        model = compiled(conv_net(filters=(3, 3, 6)))  # not 2 filters: their two overlap scores tie
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.9, cycles=1, criterion=criterion)
        recorder = Recorder(repr_callback, ["c1", "c2"])
        # The drop due after epoch 0 happens when epoch 1 begins, on the kernels recorded at the end of epoch 0.
        model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[recorder, repr_callback])
        before = recorder.kernels[0]
        if criterion == "l1":
            scores = [np.abs(np_rows(before[n], (-1,))).sum(axis=1) for n in ("c1", "c2")]
        else:
            scores = [np_overlap(before[n]) for n in ("c1", "c2")]
        expected = select_filters(scores, 0.9, higher_is_better=criterion == "l1")
        indices = repr_callback.history[0]["indices"]
        self.assertNotIn("c0", indices)
        self.assertEqual(indices, {"c1": expected[0].tolist(), "c2": expected[1].tolist()})
        self.assertEqual(repr_callback.history[0]["dropped"], {"c1": 2, "c2": 5})  # budget 8 capped at 2 + 5


class HoldTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("sgd", "adam")
    def test_dropped_filters_and_slots_stay_zero_through_s2(self, optimizer):
        model = compiled(conv_net(), optimizer)
        repr_callback = RePr(s1=1, s2=2, prune_ratio=0.3, cycles=1)
        checker = HeldAtZero(self, repr_callback)
        model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[repr_callback, checker])
        self.assertEqual(checker.checked_steps, 4)  # S2: 2 epochs of 2 steps
        self.assertEqual(checker.checked_drops, 1)
        expected_slots = {"sgd": 1, "adam": 2}[optimizer]
        self.assertLen(optimizer_slots(model.optimizer, model.get_layer("c1").kernel), expected_slots)

    def test_optimizer_slots(self):
        variable = keras.Variable(np.zeros((2, 3), np.float32))
        for optimizer, count in ((keras.optimizers.SGD(), 0), (keras.optimizers.SGD(momentum=0.5), 1),
                                 (keras.optimizers.Adam(amsgrad=True), 3),
                                 (keras.mixed_precision.LossScaleOptimizer(keras.optimizers.Adam()), 2)):
            optimizer.build([variable])
            slots = optimizer_slots(optimizer, variable)
            self.assertLen(slots, count, msg=type(optimizer).__name__)
            self.assertTrue(all(tuple(s.shape) == (2, 3) and s is not variable for s in slots))


class ReinitialisationTest(tf.test.TestCase, parameterized.TestCase):

    def test_orthogonal_directions_numpy(self):
        rng = np.random.default_rng(0)
        constraints = rng.normal(size=(5, 12))
        vectors, level = reactivation.orthogonal_directions([constraints], 4, 12, rng)
        self.assertEqual(level, 0)
        self.assertAllClose(vectors @ constraints.T, np.zeros((4, 5)), atol=1e-10)
        self.assertAllClose(vectors @ vectors.T, np.eye(4), atol=1e-10)
        self.assertEqual(reactivation.orthogonal_directions([constraints], 8, 12, rng), (None, 1))

    def test_reinitialised_filters_are_orthogonal_and_fresh(self):
        model = compiled(conv_net(filters=(4, 8, 8)))
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1, seed=3)
        recorder = Recorder(repr_callback, ["c1", "c2"])
        model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[recorder, repr_callback])
        repr_callback.on_epoch_begin(2)  # the re-initialisation due after epoch 1, with no training after it
        events = repr_callback.history
        self.assertEqual([e["event"] for e in events], ["drop", "reinit"])
        self.assertEqual(set(events[1]["levels"].values()), {"orthogonal"})
        for name, indices in events[0]["indices"].items():
            layer = model.get_layer(name)
            rows = np_rows(layer.kernel.numpy(), (-1,))
            new = unit_rows(rows[indices])
            survivors = unit_rows(np.delete(rows, indices, axis=0))
            pre_drop = unit_rows(np_rows(recorder.kernels[0][name], (-1,))[indices])
            self.assertLess(np.max(np.abs(new @ survivors.T)), 1e-5)
            self.assertLess(np.max(np.abs(new @ pre_drop.T)), 1e-5)
            self.assertAllClose(new @ new.T, np.eye(len(indices)), atol=1e-5)
            # Glorot uniform: variance 2 / (fan_in + fan_out) per value, d values per filter.
            fan_in, fan_out = rows.shape[1], 9 * layer.filters
            expected_norm = np.sqrt(rows.shape[1] * 2.0 / (fan_in + fan_out))
            self.assertAllClose(np.linalg.norm(rows[indices], axis=1), np.full(len(indices), expected_norm),
                                rtol=0.1)
            bn = model.get_layer("bn" + name[1:])
            for variable, initial in ((layer.bias, 0.0), (bn.gamma, 1.0), (bn.beta, 0.0),
                                      (bn.moving_mean, 0.0), (bn.moving_variance, 1.0)):
                self.assertAllEqual(variable.numpy()[indices], np.full(len(indices), initial))
            for path, slot, _ in dropped_variables(model, name):
                if slot.path != path:
                    self.assertAllEqual(slot.numpy()[..., indices], np.zeros_like(slot.numpy()[..., indices]))

    def test_seed_repeats_the_new_values(self):
        def reinitialised_kernel(seed):
            model = compiled(conv_net(seed=0))
            repr_callback = RePr(s1=1, s2=1, cycles=1, seed=seed)
            repr_callback.set_model(model)
            repr_callback.on_train_begin()
            for epoch in range(3):  # no training: drop when epoch 1 begins, re-initialise when epoch 2 begins
                repr_callback.on_epoch_begin(epoch)
            return np.concatenate([model.get_layer(name).kernel.numpy().ravel() for name in ("c1", "c2")])

        self.assertAllEqual(reinitialised_kernel(5), reinitialised_kernel(5))
        self.assertNotAllClose(reinitialised_kernel(5), reinitialised_kernel(6))

    @parameterized.named_parameters(
        # c1: 4 filters of 4 values, 1 dropped: no room next to 4 constraint rows, room next to 3 survivors.
        ("survivors", 4, 4, "survivors"),
        # c1: 6 filters of 2 values, 2 dropped: no room even next to the 4 survivors.
        ("initializer", 2, 6, "initializer"),
    )
    def test_fallback_when_the_null_space_is_too_small(self, first, second, level):
        model = compiled(conv_net(filters=(first, second), kernel_sizes=(1, 1)))
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1, seed=0)
        with self.assertLogs(level="WARNING") as captured:
            history = model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[repr_callback])
        self.assertIn("'c1'", "\n".join(captured.output))
        self.assertEqual(repr_callback.history[1]["levels"], {"c1": level})
        self.assertEqual(history.history["repr_fallbacks"], [0, 0, 1])
        indices = repr_callback.history[0]["indices"]["c1"]
        rows = np_rows(model.get_layer("c1").kernel.numpy(), (-1,))
        self.assertTrue(np.all(np.linalg.norm(rows[indices], axis=1) > 0))
        if level == "survivors":
            model = compiled(conv_net(filters=(first, second), kernel_sizes=(1, 1)))
            repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1, seed=0)
            model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[repr_callback])
            repr_callback.on_epoch_begin(2)
            rows = np_rows(model.get_layer("c1").kernel.numpy(), (-1,))
            survivors = unit_rows(np.delete(rows, indices, axis=0))
            self.assertLess(np.max(np.abs(unit_rows(rows[indices]) @ survivors.T)), 1e-5)


class LayoutTest(tf.test.TestCase):

    def test_separable_depthwise_and_transposed_convolutions(self):
        """SeparableConv ranks its pointwise filters, Conv2DTranspose its axis -2, depthwise layers are skipped."""
        keras.utils.set_random_seed(4)
        inputs = keras.Input((6, 6, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", name="c0")(inputs)
        x = keras.layers.SeparableConv2D(3, 3, padding="same", name="sep")(x)
        x = keras.layers.BatchNormalization(name="bn_sep")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
        x = keras.layers.Conv2DTranspose(4, 3, padding="same", name="up")(x)
        x = keras.layers.BatchNormalization(name="bn_up")(x)
        outputs = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x))
        model = compiled(keras.Model(inputs, outputs))
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.4, cycles=1, seed=1)
        checker = HeldAtZero(self, repr_callback, {"sep": "bn_sep", "up": "bn_up"})
        model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[repr_callback, checker])
        repr_callback.on_epoch_begin(2)  # re-initialise, no training after it
        self.assertEqual(checker.checked_steps, 2)
        drop, reinit = repr_callback.history
        self.assertEqual(sum(drop["dropped"].values()), 3)  # round(0.4 * (3 + 4))
        self.assertContainsSubset(drop["indices"], {"sep", "up"})
        self.assertEqual(set(reinit["levels"].values()), {"orthogonal"})
        for name, indices in drop["indices"].items():
            kernel, axes = layouts.primary_kernel(model.get_layer(name))
            rows = np_rows(kernel.numpy(), axes)
            survivors = unit_rows(np.delete(rows, indices, axis=0))
            self.assertLess(np.max(np.abs(unit_rows(rows[indices]) @ survivors.T)), 1e-5)


class TrainerLoopTest(tf.test.TestCase):

    def test_one_schedule_per_model_with_set_model(self):
        """A loop that trains two models with one callback, calling the standard hooks after set_model."""
        models = [compiled(conv_net(seed=1)), compiled(conv_net(seed=2))]
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1)
        x, y = data()
        for model in models:
            repr_callback.set_model(model)
            repr_callback.on_train_begin()
        for epoch in range(3):
            for model in models[: 2 if epoch < 2 else 1]:  # the second model trains only the first two epochs
                repr_callback.set_model(model)
                repr_callback.on_epoch_begin(epoch)
                for step in range(2):
                    repr_callback.on_train_batch_begin(step)
                    model.train_on_batch(x[8 * step: 8 * step + 8], y[8 * step: 8 * step + 8])
                    repr_callback.on_train_batch_end(step)
                logs = {}
                repr_callback.on_epoch_end(epoch, logs)
        self.assertEqual(logs["repr_phase"], 2)
        self.assertEqual(repr_callback.state_of(models[0]), ("done", 1, 0))
        self.assertEqual(repr_callback.state_of(models[1]), ("pruned", 1, 5))
        events = [(e["model"], e["event"]) for e in repr_callback.history]
        self.assertEqual(events, [(models[0].name, "drop"), (models[1].name, "drop"), (models[0].name, "reinit")])
        assert_filters_zero(self, models[1], repr_callback.history[1]["indices"], slots=False)

    def test_models_and_optimizers_set_by_a_trainer(self):
        """Several models trained in one step, with optimizers of their own (not model.optimizer)."""
        models = [conv_net(seed=1), conv_net(seed=2)]
        optimizers = [keras.optimizers.Adam(0.01), keras.optimizers.Adam(0.01)]
        for model, optimizer in zip(models, optimizers):
            optimizer.build(model.trainable_variables)

        @tf.function
        def train_step(x, y):
            for model, optimizer in zip(models, optimizers):
                with tf.GradientTape() as tape:
                    loss = LOSS(y, model(x, training=True))
                grads = tape.gradient(loss, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))

        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1)
        repr_callback.models, repr_callback.optimizers = models, optimizers
        repr_callback.on_train_begin()
        x, y = data()
        all_logs = []
        for epoch in range(3):
            repr_callback.on_epoch_begin(epoch)
            for k, model in enumerate(models):
                if epoch == 1:  # the drop cleared the weights and their slots
                    assert_filters_zero(self, model, repr_callback.history[k]["indices"], optimizer=optimizers[k])
                if epoch == 2:  # the re-initialised filters start with zero slots
                    assert_filters_zero(self, model, repr_callback.history[k]["indices"], optimizer=optimizers[k],
                                        weights=False)
            for step in range(2):
                repr_callback.on_train_batch_begin(step)
                train_step(x[8 * step: 8 * step + 8], y[8 * step: 8 * step + 8])
                repr_callback.on_train_batch_end(step)
                if epoch == 1:  # the step's own update kept them at zero
                    for k, model in enumerate(models):
                        assert_filters_zero(self, model, repr_callback.history[k]["indices"], slots=False)
            logs = {}
            repr_callback.on_epoch_end(epoch, logs)
            all_logs.append(logs)
        expected = {"repr_phase": 0, "repr_cycle": 1, "repr_dropped": 0, "repr_fallbacks": 0}
        self.assertEqual(all_logs[0], {f"{key}_{k}": value for k in range(2) for key, value in expected.items()})
        self.assertEqual((all_logs[1]["repr_phase_0"], all_logs[1]["repr_dropped_1"]), (1, 5))
        self.assertEqual(all_logs[2]["repr_phase_1"], 2)
        self.assertEqual([e["event"] for e in repr_callback.history], ["drop", "drop", "reinit", "reinit"])

    def test_optimizers_must_match_models(self):
        repr_callback = RePr(1, 1)
        repr_callback.models, repr_callback.optimizers = [conv_net()], []
        with self.assertRaisesRegex(ValueError, "1 models but 0 optimizers"):
            repr_callback.on_train_begin()


class DistributedTest(tf.test.TestCase):

    def test_mirrored_strategy_keeps_replicas_equal(self):
        strategy = testing_utils.mirrored_strategy()
        with strategy.scope():
            model = compiled(conv_net())
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1, seed=0)
        checker = HeldAtZero(self, repr_callback)
        model.fit(*data(), batch_size=8, epochs=3, verbose=0, callbacks=[repr_callback, checker])
        self.assertEqual(checker.checked_steps, 2)
        self.assertEqual([e["event"] for e in repr_callback.history], ["drop", "reinit"])
        state = repr_callback.state_for(model)
        for variable in model.trainable_weights + model.optimizer.variables + state.weights:
            replicas = [np.asarray(r) for r in strategy.experimental_local_results(variable.value)]
            self.assertLen(replicas, 2)
            self.assertAllEqual(replicas[0], replicas[1], msg=variable.path)
        dropped = repr_callback.history[0]["indices"]
        for name, indices in dropped.items():
            rows = np_rows(model.get_layer(name).kernel.numpy(), (-1,))
            self.assertTrue(np.all(np.linalg.norm(rows[indices], axis=1) > 0))


def all_weights(model):
    return [w.numpy() for w in model.weights + model.optimizer.variables]


class CheckpointTest(tf.test.TestCase, parameterized.TestCase):
    """RePr's schedule, masks, pre-drop values and seed live in variables that the model's checkpoints carry."""

    def test_state_is_saved_with_the_model_but_is_not_one_of_its_weights(self):
        model = compiled(conv_net())
        weights = [w.path for w in model.weights]
        repr_callback = RePr(s1=1, s2=1, cycles=1, ranking="layer", seed=4)
        model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[repr_callback])  # pruned now
        self.assertEqual([w.path for w in model.weights], weights)
        self.assertLen(model.layers, 12)
        state = repr_callback.state_for(model)
        self.assertEqual(int(state.units_done.numpy()), 2)
        path = os.path.join(self.get_temp_dir(), "pruned.weights.h5")
        model.save_weights(path)

        restored = compiled(conv_net(seed=9))
        restored.optimizer.build(restored.trainable_variables)
        other = RePr(s1=1, s2=1, cycles=1, seed=5)
        other.set_model(restored)
        restored.load_weights(path)
        mine, theirs = repr_callback.state_for(model), other.state_for(restored)
        self.assertLen(theirs.weights, len(mine.weights))
        for a, b in zip(mine.weights, theirs.weights):
            self.assertAllEqual(a.numpy(), b.numpy(), msg=a.name)
        self.assertEqual(other.state_of(restored), ("pruned", 1, repr_callback.state_of(model)[2]))
        keep, pre_drop = mine.keep[1].numpy(), mine.pre_drop[1].numpy()  # c2: 8 filters of 3 * 3 * 8 values
        self.assertEqual(pre_drop.shape, (8, 72))
        self.assertAllEqual(pre_drop[keep == 1], np.zeros(((keep == 1).sum(), 72)))
        self.assertAllEqual(np.flatnonzero(keep == 0), repr_callback.history[0]["indices"]["c2"])
        self.assertTrue(np.all(np.linalg.norm(pre_drop[keep == 0], axis=1) > 0))

        plain = compiled(conv_net(seed=9))  # a model without RePr loads the file too
        plain.load_weights(path)
        self.assertAllEqual(plain.get_layer("c2").kernel.numpy(), model.get_layer("c2").kernel.numpy())
        self.assertFalse(hasattr(plain, reactivation.STATE_ATTRIBUTE))

    @staticmethod
    def fit_run(backup_dir=None, interrupt=None, backup_first=True):
        """A seeded 6-epoch model.fit run with RePr (2 cycles), optionally backed up and interrupted."""
        model = compiled(conv_net(seed=3))
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=2, seed=11)
        callbacks = [repr_callback]
        if backup_dir:
            backup = keras.callbacks.BackupAndRestore(backup_dir)
            callbacks = [backup, repr_callback] if backup_first else [repr_callback, backup]
        if interrupt is not None:
            callbacks.append(testing_utils.interrupt_after(interrupt))
        model.fit(*data(24), batch_size=8, epochs=6, shuffle=False, verbose=0, callbacks=callbacks)
        return model, repr_callback

    @classmethod
    @functools.cache
    def uninterrupted_fit(cls):
        """The uninterrupted run, once per class: its weights, optimizer variables, RePr state and events."""
        model, repr_callback = cls.fit_run()
        return ([(w.path, w.numpy()) for w in model.weights + model.optimizer.variables],
                [(v.name, v.numpy()) for v in repr_callback.state_for(model).weights],
                [(e["event"], e["unit"]) for e in repr_callback.history])

    @parameterized.named_parameters(
        ("full_backup_first", 2, True), ("pruned_backup_first", 3, True), ("pruned_repr_first", 3, False))
    def test_fit_with_backup_and_restore_resumes_exactly(self, interrupted_after, backup_first):
        """Interrupted after an epoch and restarted, a run ends with the weights of an uninterrupted one."""
        full_weights, full_state, full_events = self.uninterrupted_fit()
        self.assertEqual(full_events, [("drop", 1), ("reinit", 2), ("drop", 3), ("reinit", 4)])
        backup_dir = os.path.join(self.get_temp_dir(), f"backup_{interrupted_after}_{backup_first}")
        with self.assertRaises(KeyboardInterrupt):
            self.fit_run(backup_dir, interrupt=interrupted_after, backup_first=backup_first)
        resumed, resumed_callback = self.fit_run(backup_dir, backup_first=backup_first)
        self.assertEqual(resumed_callback.history[0]["unit"], 4 if interrupted_after == 3 else 3)
        resumed_weights = all_weights(resumed)
        self.assertLen(resumed_weights, len(full_weights))
        for (path, a), b in zip(full_weights, resumed_weights):
            self.assertAllEqual(a, b, msg=path)
        resumed_state = resumed_callback.state_for(resumed).weights
        self.assertLen(resumed_state, len(full_state))
        for (name, a), b in zip(full_state, resumed_state):
            self.assertAllEqual(a, b.numpy(), msg=name)

    @parameterized.named_parameters(("set_by_the_trainer", False), ("set_by_the_user", True))
    def test_graft_trainer_backup_resumes_exactly(self, user_sets_models):
        """GraftTrainer(backup_dir=...): its tf.train.Checkpoint of the models carries their RePr states, attached
        before or after it restores (deferred restoration); two steps per compiled call."""
        full_variables, full_events = self.uninterrupted_trainer_fit()
        self.assertLen(full_events, 8)  # 2 models x (2 drops + 2 re-initialisations)
        backup_dir = os.path.join(self.get_temp_dir(), f"graft_backup_{user_sets_models}")
        with self.assertRaises(KeyboardInterrupt):
            self.trainer_run(backup_dir, interrupt=3, user_sets_models=user_sets_models)
        resumed, resumed_callback = self.trainer_run(backup_dir, user_sets_models=user_sets_models)
        self.assertEqual([e["event"] for e in resumed_callback.history], ["reinit", "reinit"])
        resumed_variables = self.trainer_variables(resumed)
        self.assertLen(resumed_variables, len(full_variables))
        for (path, a), (_, b) in zip(full_variables, resumed_variables):
            self.assertAllEqual(a, b, msg=path)

    @staticmethod
    def trainer_run(backup_dir=None, interrupt=None, user_sets_models=False):
        """A seeded 6-epoch GraftTrainer run of 2 models with RePr, two steps per compiled call."""
        from keras_graft.trainer import GraftTrainer

        trainer = GraftTrainer(lambda: conv_net(), 2, optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                               loss=LOSS, seed=5, backup_dir=backup_dir, steps_per_execution=2)
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=2, seed=11)
        if user_sets_models:
            repr_callback.models, repr_callback.optimizers = trainer.models, trainer.optimizers
        callbacks = [repr_callback] + ([testing_utils.interrupt_after(interrupt)] if interrupt is not None else [])
        trainer.fit(data(24), epochs=6, batch_size=8, verbose=0, callbacks=callbacks)
        return trainer, repr_callback

    @staticmethod
    def trainer_variables(trainer):
        return [(v.path, v.numpy()) for model, optimizer in zip(trainer.models, trainer.optimizers)
                for v in model.weights + optimizer.variables]

    @classmethod
    @functools.cache
    def uninterrupted_trainer_fit(cls):
        """The uninterrupted GraftTrainer run (RePr attached by the trainer), once per class."""
        trainer, repr_callback = cls.trainer_run()
        return cls.trainer_variables(trainer), [(e["event"], e["unit"]) for e in repr_callback.history]


class StepsPerExecutionTest(tf.test.TestCase):

    def test_hold_inside_the_compiled_step(self):
        """With 2 steps per compiled call the dropped filters are zero after every step, and the step unit counts
        the steps of each call."""
        model = conv_net()
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS, steps_per_execution=2)
        repr_callback = RePr(s1=1, s2=2, prune_ratio=0.3, cycles=1)
        checker = HeldAtZero(self, repr_callback)
        model.fit(*data(32), batch_size=8, epochs=3, verbose=0, callbacks=[repr_callback, checker])
        self.assertEqual(checker.checked_steps, 4)  # 2 calls of 2 steps in each of the 2 pruned epochs
        self.assertEqual(checker.checked_drops, 1)

        model = conv_net()
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS, steps_per_execution=2)
        repr_callback = RePr(s1=4, s2=2, prune_ratio=0.3, cycles=1, unit="step")
        model.fit(*data(32), batch_size=8, epochs=3, verbose=0, callbacks=[repr_callback])  # 12 steps, 6 calls
        self.assertEqual([(e["event"], e["unit"]) for e in repr_callback.history], [("drop", 4), ("reinit", 6)])
        self.assertEqual(int(repr_callback.state_for(model).units_done.numpy()), 12)


class LayerRankingTest(tf.test.TestCase):

    def test_layer_ranking_drops_the_share_of_every_layer(self):
        model = compiled(conv_net(filters=(4, 8, 10)))
        repr_callback = RePr(s1=1, s2=1, prune_ratio=0.3, cycles=1, ranking="layer")
        recorder = Recorder(repr_callback, ["c1", "c2"])
        model.fit(*data(), batch_size=8, epochs=2, verbose=0, callbacks=[recorder, repr_callback])
        indices = repr_callback.history[0]["indices"]
        for name, count in (("c1", 2), ("c2", 3)):  # round(0.3 * 8), round(0.3 * 10)
            expected = select_filters([np_overlap(recorder.kernels[0][name])], 0.3)[0]
            self.assertEqual(indices[name], expected.tolist())
            self.assertLen(indices[name], count)


class BadInputTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(
        {"prune_ratio": 0.0}, {"prune_ratio": 1.0}, {"prune_ratio": -0.2},
        {"s1": 0}, {"s2": -1}, {"s1": 1.5}, {"cycles": 0}, {"cycles": True},
        {"unit": "batch"}, {"criterion": "bn_scale"}, {"criterion": "nope"}, {"ranking": "local"},
    )
    def test_bad_arguments(self, **override):
        kwargs = dict(dict(s1=1, s2=1), **override)
        with self.assertRaises(ValueError):
            RePr(**kwargs)

    @parameterized.named_parameters(
        ("prune_ratio", {"prune_ratio": "0.3"}, TypeError, "prune_ratio must be a number, got '0.3'"),
        ("s1", {"s1": "20"}, TypeError, "s1 must be a positive integer, got '20'"),
        ("verbose", {"verbose": 2}, ValueError, "verbose must be 0 or 1, got 2"),
        ("seed", {"seed": "x"}, TypeError, "seed must be an integer, got 'x'"),
        ("unit", {"unit": 1}, ValueError, "Unknown RePr unit 1"),
    )
    def test_arguments_are_named(self, override, error, message):
        with self.assertRaisesRegex(error, message):
            RePr(**dict(dict(s1=1, s2=1), **override))

    def assert_fails_before_training(self, model, repr_callback, message):
        before = [w.numpy() for w in model.weights]
        with self.assertRaisesRegex(ValueError, message):
            model.fit(*data(), batch_size=8, epochs=1, verbose=0, callbacks=[repr_callback])
        for old, new in zip(before, model.weights):
            self.assertAllEqual(old, new.numpy())

    def test_fewer_than_two_convs(self):
        self.assert_fails_before_training(compiled(conv_net(filters=(4,), kernel_sizes=(3,))), RePr(1, 1),
                                          "at least two convolution layers")

    def test_criterion_that_does_not_rank_filters(self):
        class LayerOnly(criteria.Criterion):
            name = "layer_only"

            def __call__(self, kernel, per_filter=False, filter_axes=-1):
                return tf.reduce_mean(tf.abs(kernel))

        self.assert_fails_before_training(compiled(conv_net()), RePr(1, 1, criterion=LayerOnly()),
                                          "does not rank filters")

    def test_a_step_traced_before_repr_is_detected(self):
        model = conv_net()
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        optimizer.build(model.trainable_variables)

        @tf.function
        def train_step(x, y):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

        x, y = data()
        train_step(x[:8], y[:8])  # traced before RePr set the constraints that hold dropped filters
        repr_callback = RePr(s1=1, s2=1, cycles=1)
        repr_callback.models, repr_callback.optimizers = [model], [optimizer]
        repr_callback.on_train_begin()
        repr_callback.on_epoch_begin(0)
        repr_callback.on_epoch_begin(1)  # drop
        train_step(x[:8], y[:8])
        with self.assertRaisesRegex(RuntimeError, "compiled before RePr"):
            repr_callback.on_train_batch_end(0)

    def test_no_optimizer(self):
        repr_callback = RePr(1, 1)
        repr_callback.set_model(conv_net())
        with self.assertRaisesRegex(ValueError, "no optimizer"):
            repr_callback.on_train_begin()

    def test_nothing_to_drop(self):
        self.assert_fails_before_training(compiled(conv_net(filters=(4, 1))), RePr(1, 1), "cannot drop any filter")


class ConfigTest(tf.test.TestCase):

    def test_defaults_follow_the_reimplementations_and_warn_about_short_runs(self):
        repr_callback = RePr()
        self.assertEqual((repr_callback.s1, repr_callback.s2, repr_callback.prune_ratio, repr_callback.cycles),
                         (20, 10, 0.3, 3))
        self.assertEqual(repr_callback.total_units, 110)  # 3 cycles of 30 epochs, then S1 = 20 normal epochs
        model = compiled(conv_net())
        with self.assertLogs(level="WARNING") as captured:
            model.fit(*data(), batch_size=8, epochs=4, verbose=0, callbacks=[RePr(s1=1, s2=1, cycles=2)])
        self.assertIn("4 epochs leave 0 epochs", "\n".join(captured.output))

    def test_get_config_round_trip(self):
        repr_callback = RePr(20, 10, prune_ratio=0.25, cycles=2, criterion="l1", unit="step", ranking="layer", seed=7)
        config = repr_callback.get_config()
        self.assertEqual(config["criterion"], {"class_name": "L1Norm", "config": {}})
        self.assertEqual(RePr.from_config(config).get_config(), config)


if __name__ == "__main__":
    tf.test.main()
