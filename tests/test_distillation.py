"""Distillation: the soft terms against NumPy, frozen teachers, bad input, and cultivation in GraftTrainer."""

import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import keras_graft
from keras_graft.distillation import Distillation

import testing_utils


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_soft_ce(p, student_logits, tau):
    q = np_softmax(student_logits / tau)
    return tau**2 * np.mean(-(p * np.log(q)).sum(axis=-1))


def classifier(seed, classes=4, name=None):
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes)(hidden), name=name)


class LossTest(tf.test.TestCase):

    def test_teachers_term_matches_numpy(self):
        teachers = [classifier(1, name="t1"), classifier(2, name="t2")]
        students = [classifier(3)]
        distillation = Distillation(teachers, temperature=3.0, weight=0.7)
        distillation.build(students)
        x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
        student_logits = students[0](x).numpy()
        targets = (np_softmax(teachers[0](x).numpy() / 3.0) + np_softmax(teachers[1](x).numpy() / 3.0)) / 2
        self.assertAllClose(distillation.teacher_probabilities(x), targets, rtol=1e-5)
        (loss,) = distillation.losses([student_logits], distillation.teacher_probabilities(x))
        self.assertAllClose(loss, 0.7 * np_soft_ce(targets, student_logits, 3.0), rtol=1e-5)

    def test_mutual_term_matches_numpy(self):
        rng = np.random.default_rng(1)
        logits = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
        distillation = Distillation([], temperature=2.0, mutual=True, mutual_weight=0.5)
        losses = distillation.losses([tf.constant(z) for z in logits], None)
        for k in range(3):
            expected = np.mean([np_soft_ce(np_softmax(logits[j] / 2.0), logits[k], 2.0) for j in range(3) if j != k])
            self.assertAllClose(losses[k], 0.5 * expected, rtol=1e-5)

    def test_probability_outputs(self):
        rng = np.random.default_rng(2)
        logits = [rng.normal(size=(4, 3)) for _ in range(2)]
        probabilities = [tf.constant(np_softmax(z), tf.float32) for z in logits]
        losses = Distillation([], mutual=True, from_logits=False).losses(probabilities, None)
        # softmax(log(softmax(z)) / tau) = softmax(z / tau): the same loss as from the logits.
        self.assertAllClose(losses[0], np_soft_ce(np_softmax(logits[1] / 2.0), logits[0], 2.0), rtol=1e-4)

    def test_no_gradient_into_teachers(self):
        teacher, student = classifier(1), classifier(2)
        distillation = Distillation([teacher])
        distillation.build([student])
        x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
        with tf.GradientTape(persistent=True) as tape:
            (loss,) = distillation.losses([student(x)], distillation.teacher_probabilities(x))
        self.assertTrue(all(g is None for g in tape.gradient(loss, teacher.weights)))
        self.assertTrue(all(g is not None for g in tape.gradient(loss, student.trainable_weights)))
        self.assertFalse(teacher.trainable)


class ConfigTest(tf.test.TestCase):

    def test_config_round_trip_with_teacher_paths(self):
        path = os.path.join(self.get_temp_dir(), "teacher.keras")
        classifier(1).save(path)
        distillation = Distillation([path], temperature=3.0, weight=0.5)
        clone = Distillation.from_config(distillation.get_config())
        self.assertEqual(clone.get_config(), distillation.get_config())


class KerasDistillerTest(tf.test.TestCase):

    def test_grafting_the_student_of_a_keras_distiller(self):
        teacher, student, peer = classifier(1), classifier(2), classifier(3)
        distiller = keras.distillation.Distiller(
            teacher=teacher, student=student,
            distillation_losses=keras.distillation.LogitsDistillation(temperature=2.0))
        distiller.compile(optimizer="sgd",
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
        y = np.arange(16) % 4
        teacher_before = teacher.get_weights()
        history = distiller.fit(x, y, epochs=2, batch_size=8, verbose=0,
                                callbacks=[keras_graft.Grafting([peer], model=distiller.student)])
        self.assertEqual(history.history["graft_layers"], [0, 2])  # The round after epoch 1 opens epoch 2.
        for old, now in zip(teacher_before, teacher.get_weights()):
            self.assertAllEqual(old, now)


def trainer_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, (np.abs(x[:, 0]) * 2).astype(np.int32) % 4))


class CultivationTest(tf.test.TestCase, parameterized.TestCase):

    def _fit(self, strategy, distillation, grafting=None, data_order="shared", seed=0):
        with strategy.scope():
            teacher = classifier(7, name="teacher")
        trainer = keras_graft.GraftTrainer(
            lambda: classifier(None), num_models=2, optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
            grafting=grafting, strategy=strategy, data_order=data_order, seed=seed,
            distillation=distillation(teacher))
        teacher_before = teacher.get_weights()
        history = trainer.fit(trainer_data(), epochs=2, batch_size=16, validation_data=trainer_data(32, 1),
                              verbose=0)
        for old, now in zip(teacher_before, teacher.get_weights()):
            self.assertAllEqual(old, now)
        return trainer, history

    def _cultivate(self, strategy):
        trainer, history = self._fit(strategy, lambda t: Distillation([t], temperature=2.0),
                                     grafting=keras_graft.Grafting())
        return history.history, [w.numpy() for w in trainer.models[0].weights], trainer

    @parameterized.named_parameters(*testing_utils.STRATEGIES)
    def test_cultivation(self, strategy):
        """Cultivation under each strategy: the logs, both peers equal after the final 2-model graft, and the same
        losses and weights as under the default strategy."""
        history, weights, trainer = self._cultivate(testing_utils.strategy(strategy))
        for key in ("task_loss_0", "distill_loss_1", "val_distill_loss_0", "graft_alpha"):
            self.assertIn(key, history)
        self.assertGreater(history["distill_loss_0"][-1], 0.0)
        for a, b in zip(trainer.models[0].weights, trainer.models[1].weights):  # grafted: N = 2 ends equal
            self.assertAllClose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        if strategy != "default":
            reference_history, reference_weights, _ = self._cultivate(tf.distribute.get_strategy())
            self.assertAllClose(reference_history["loss"], history["loss"], rtol=1e-4)
            for a, b in zip(reference_weights, weights):
                self.assertAllClose(a, b, rtol=1e-4, atol=1e-5)

    def test_loss_is_task_plus_distillation(self):
        _, history = self._fit(tf.distribute.get_strategy(), lambda t: Distillation([t], weight=0.5))
        h = history.history
        self.assertAllClose(h["loss_0"], np.add(h["task_loss_0"], h["distill_loss_0"]), rtol=1e-5)

    def test_mutual_needs_shared_batches(self):
        _, history = self._fit(tf.distribute.get_strategy(), lambda t: Distillation([], mutual=True))
        self.assertGreater(history.history["distill_loss_0"][0], 0.0)
        with self.assertRaisesRegex(ValueError, "data_order='shared'"):
            self._fit(tf.distribute.get_strategy(), lambda t: Distillation([], mutual=True), data_order="per_model")

    def test_teachers_with_per_model_batches(self):
        _, history = self._fit(tf.distribute.get_strategy(), lambda t: Distillation([t]), data_order="per_model")
        self.assertTrue(np.isfinite(history.history["distill_loss_1"]).all())


class BadInputTest(tf.test.TestCase):

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "temperature must be a finite number > 0, got 0"):
            Distillation([classifier(1)], temperature=0)
        with self.assertRaisesRegex(ValueError, "weight must be a finite number >= 0, got -1"):
            Distillation([classifier(1)], weight=-1)
        with self.assertRaisesRegex(ValueError, "nothing to learn from"):
            Distillation([])
        with self.assertRaisesRegex(ValueError, "at least 2 students"):
            Distillation([], mutual=True).build([classifier(1)])
        with self.assertRaisesRegex(ValueError, r"outputs shape \(5,\) but the students output \(4,\)"):
            Distillation([classifier(1, classes=5)]).build([classifier(2)])
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            Distillation(["/nonexistent/teacher.keras"]).build([classifier(2)])

    def test_arguments_are_named(self):
        teacher = classifier(1)
        for kwargs, error, message in [
                ({"weight": float("inf")}, ValueError, "Distillation: weight must be a finite number >= 0, got inf"),
                ({"mutual_weight": float("nan")}, ValueError, "mutual_weight must be a finite number >= 0, got nan"),
                ({"temperature": "2"}, TypeError, "temperature must be a number, got '2'"),
                ({"temperature": float("inf")}, ValueError, "temperature must be a finite number > 0, got inf"),
                ({"weight": None}, TypeError, "weight must be a number, got None"),
                ({"mutual": "yes"}, TypeError, "mutual must be True or False, got 'yes'"),
                ({"from_logits": 1}, TypeError, "from_logits must be True or False, got 1")]:
            with self.assertRaisesRegex(error, message):
                Distillation([teacher], **kwargs)
        with self.assertRaisesRegex(TypeError, "teachers must be a Keras model, a path to a .keras file or a list "
                                               "of them, got 3"):
            Distillation(3)
        with self.assertRaisesRegex(TypeError, "teacher 1 must be a Keras model or a path to a .keras file, got "
                                               "None"):
            Distillation([teacher, None])

    def test_teacher_with_another_input_shape_fails_at_construction(self):
        inputs = keras.Input((7,))
        teacher = keras.Model(inputs, keras.layers.Dense(4)(inputs), name="wide_teacher")
        with self.assertRaisesRegex(ValueError, r"Teacher 0 \('wide_teacher'\) takes inputs of shape \(7,\) but the "
                                                r"students take \(6,\)"):
            keras_graft.GraftTrainer(lambda: classifier(None), num_models=2, optimizer="sgd",
                                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                     distillation=Distillation([teacher]))

    def test_teacher_from_file(self):
        path = os.path.join(self.get_temp_dir(), "teacher.keras")
        teacher = classifier(1)
        teacher.save(path)
        distillation = Distillation([path])
        distillation.build([classifier(2)])
        x = np.ones((2, 6), np.float32)
        self.assertAllClose(distillation.teachers[0](x), teacher(x), rtol=1e-6)
        weights_path = os.path.join(self.get_temp_dir(), "teacher.weights.h5")
        teacher.save_weights(weights_path)
        with self.assertRaisesRegex(ValueError, "load_weights"):
            Distillation([weights_path]).build([classifier(2)])


if __name__ == "__main__":
    tf.test.main()
