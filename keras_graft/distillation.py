"""Distillation for GraftTrainer: cultivation (grafting + frozen teachers) and deep mutual learning.

Cultivation ("Filter Grafting for Deep Neural Networks: Reason, Method, and Cultivation", the extended grafting
paper): every student learns from frozen teachers while the students graft among themselves. Student k's loss is

    L_k = CE(y, s_k) + weight * tau^2 * CE(mean_m softmax(t_m / tau), softmax(s_k / tau)),

with M teachers t_m and temperature tau (2 by default); the tau^2 factor keeps the soft term's gradient on the
scale of the hard one (Hinton et al., 2015). With ``mutual=True`` (deep mutual learning, Zhang et al., CVPR 2018,
the baseline the grafting paper compares against) each student also learns from the other students' current
predictions, held constant:

    + mutual_weight * tau^2 * mean_{j != k} CE(softmax(s_j / tau), softmax(s_k / tau)).

For one model trained with ``model.fit`` use Keras' own ``keras.distillation.Distiller`` and graft its student
with ``Grafting(peers, model=distiller.student)``.
"""

import os

import keras
import tensorflow as tf

from keras_graft import checks


def soft_cross_entropy(target_probabilities, student_logits, temperature):
    """tau^2 * CE(p, softmax(s / tau)), averaged over the batch and divided by the number of replicas.

    ``keras.losses.CategoricalCrossentropy`` with the default reduction does both, as the task loss does.
    """
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    return temperature**2 * loss(tf.stop_gradient(target_probabilities), student_logits / temperature)


def _load_teacher(teacher):
    if isinstance(teacher, keras.Model):
        return teacher
    path = os.fspath(teacher)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"Teacher file '{path}' does not exist.")
    if not path.endswith(".keras"):
        raise ValueError(f"Teacher '{path}' must be a Keras model or a '.keras' file saved with model.save(); "
                         "for a '.weights.h5' file build the model and call load_weights first.")
    return keras.saving.load_model(path, compile=False)


class Distillation:
    """What students distil from: frozen teachers, each other (``mutual``), or both.

    Args:
      teachers: Keras models or paths to ``.keras`` files; their probabilities are averaged. Frozen: run in
        inference mode, no gradient reaches them.
      temperature: tau > 0.
      weight: weight >= 0 of the teachers' term.
      mutual: also distil from the other students (deep mutual learning).
      mutual_weight: weight >= 0 of the mutual term (default ``weight``).
      from_logits: whether models output logits (True, the papers' networks) or probabilities.
    """

    def __init__(self, teachers=(), temperature=2.0, weight=1.0, mutual=False, mutual_weight=None,
                 from_logits=True):
        temperature = checks.number("Distillation", "temperature", temperature, minimum=0, open_minimum=True)
        weight = checks.number("Distillation", "weight", weight, minimum=0)
        mutual_weight = weight if mutual_weight is None else checks.number("Distillation", "mutual_weight",
                                                                           mutual_weight, minimum=0)
        mutual = checks.boolean("Distillation", "mutual", mutual)
        from_logits = checks.boolean("Distillation", "from_logits", from_logits)
        if isinstance(teachers, (keras.Model, str, os.PathLike)):
            teachers = [teachers]
        elif isinstance(teachers, (list, tuple)):
            teachers = list(teachers)
        else:
            raise TypeError(f"Distillation: teachers must be a Keras model, a path to a .keras file or a list of "
                            f"them, got {checks.shown(teachers)}.")
        for m, teacher in enumerate(teachers):
            if not isinstance(teacher, (keras.Model, str, os.PathLike)):
                raise TypeError(f"Distillation: teacher {m} must be a Keras model or a path to a .keras file, got "
                                f"{checks.shown(teacher)}.")
        if not teachers and not mutual:
            raise ValueError("Distillation has nothing to learn from: give teachers, or mutual=True.")
        self.teacher_sources = teachers
        self.teachers = []
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.mutual = bool(mutual)
        self.mutual_weight = float(mutual_weight)
        self.from_logits = bool(from_logits)

    def get_config(self):
        return {
            "teachers": [t if isinstance(t, str) else getattr(t, "name", None) for t in self.teacher_sources],
            "temperature": self.temperature,
            "weight": self.weight,
            "mutual": self.mutual,
            "mutual_weight": self.mutual_weight,
            "from_logits": self.from_logits,
        }

    @classmethod
    def from_config(cls, config):
        """Inverse of ``get_config`` for teachers given as ``.keras`` paths (in-memory teachers are saved by name)."""
        return cls(**config)

    def build(self, students):
        """Loads and freezes the teachers (call in the strategy's scope) and checks them against the students."""
        if self.mutual and len(students) < 2:
            raise ValueError("Mutual distillation needs at least 2 students; with 1 model there is nothing to "
                             "learn from but teachers.")
        self.teachers = [_load_teacher(t) for t in self.teacher_sources]
        student_shape = tuple(students[0].outputs[0].shape[1:])
        student_inputs = [tuple(t.shape[1:]) for t in students[0].inputs]
        for m, teacher in enumerate(self.teachers):
            teacher.trainable = False
            teacher_inputs = [tuple(t.shape[1:]) for t in getattr(teacher, "inputs", None) or []]
            if teacher_inputs and (len(teacher_inputs) != len(student_inputs) or not all(
                    tf.TensorShape(t).is_compatible_with(s) for t, s in zip(teacher_inputs, student_inputs))):
                shown = teacher_inputs[0] if len(teacher_inputs) == 1 else teacher_inputs
                expected = student_inputs[0] if len(student_inputs) == 1 else student_inputs
                raise ValueError(f"Teacher {m} ('{teacher.name}') takes inputs of shape {shown} but the students take "
                                 f"{expected}; a teacher reads the students' batches, so its inputs must match.")
            teacher_shape = tuple(teacher.outputs[0].shape[1:])
            if teacher_shape != student_shape:
                raise ValueError(f"Teacher {m} ('{teacher.name}') outputs shape {teacher_shape} but the students "
                                 f"output {student_shape}; teachers and students must predict the same classes.")

    def _logits(self, outputs):
        return outputs if self.from_logits else tf.math.log(tf.maximum(outputs, 1e-12))

    def teacher_probabilities(self, x):
        """mean_m softmax(t_m(x) / tau), with no gradient; None without teachers."""
        if not self.teachers:
            return None
        probabilities = [
            tf.nn.softmax(self._logits(tf.stop_gradient(t(x, training=False))) / self.temperature)
            for t in self.teachers
        ]
        return tf.add_n(probabilities) / len(probabilities)

    def losses(self, student_outputs, teacher_probabilities):
        """Distillation loss per student: the teachers' term plus the mutual term (a list of scalars)."""
        logits = [self._logits(outputs) for outputs in student_outputs]
        soft = [tf.nn.softmax(z / self.temperature) for z in logits] if self.mutual else None
        losses = []
        for k, z in enumerate(logits):
            loss = tf.zeros([], z.dtype)
            if teacher_probabilities is not None:
                loss += self.weight * soft_cross_entropy(tf.cast(teacher_probabilities, z.dtype), z, self.temperature)
            if self.mutual:
                others = [soft_cross_entropy(soft[j], z, self.temperature) for j in range(len(logits)) if j != k]
                loss += self.mutual_weight * tf.add_n(others) / len(others)
            losses.append(loss)
        return losses
