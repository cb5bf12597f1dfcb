"""keras_internals: the only module that touches Keras internals, and each of its wrappers against Keras."""

import ast
import contextlib
import io
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_graft import keras_internals

import testing_utils  # noqa: F401  (two logical CPUs, as in every test file)

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_graft")
#: The private Keras attributes keras_internals wraps.
PRIVATE = ("_inbound_nodes", "_outbound_nodes", "_initial_epoch", "_track_trackable", "_get_variable_index",
           "_trainable_variables")


def package_sources():
    """{path relative to keras_graft/: source} of every module of the package, models/ included."""
    sources = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    sources[os.path.relpath(path, PACKAGE)] = f.read()
    return sources


def keras_src_uses(source):
    """Lines that import ``keras.src`` or reach it as an attribute (``keras.src.x``); docstrings do not count."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.startswith("keras.src") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keras.src"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and ast.unparse(node) == "keras.src":
            lines.append(node.lineno)
    return lines


class ConfinementTest(tf.test.TestCase):

    def test_only_keras_internals_uses_keras_src(self):
        sources = package_sources()
        self.assertIn("keras_internals.py", sources)
        self.assertNotEmpty(keras_src_uses(sources["keras_internals.py"]))  # the check sees an import
        uses = {path: keras_src_uses(source) for path, source in sources.items() if path != "keras_internals.py"}
        self.assertEqual({path: lines for path, lines in uses.items() if lines}, {})

    def test_only_keras_internals_reads_private_keras_attributes(self):
        pattern = re.compile(r"\b(" + "|".join(PRIVATE) + r")\b")
        sources = package_sources()
        self.assertEqual(set(pattern.findall(sources["keras_internals.py"])), set(PRIVATE))
        found = {path: sorted(set(pattern.findall(source))) for path, source in sources.items()
                 if path != "keras_internals.py"}
        self.assertEqual({path: names for path, names in found.items() if names}, {})


class WrapperTest(tf.test.TestCase):

    def test_print_msg_writes_a_line_to_stdout(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            keras_internals.print_msg("grafting round 3")
        self.assertEqual(out.getvalue(), "grafting round 3\n")

    def test_optimizer_slots(self):
        """After one step from zero slots: SGD momentum m = -lr g; Adam m = (1 - b1) g, v = (1 - b2) g^2."""
        variables = [keras.Variable(np.ones(3, np.float32), name="a"), keras.Variable(np.ones(2, np.float32))]
        gradient = np.array([1.0, -2.0], np.float32)
        sgd = keras.optimizers.SGD(0.1, momentum=0.9)
        adam = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.1), initial_scale=1.0)  # unwrapped
        self.assertEqual(keras_internals.optimizer_slots(sgd, variables[1]), [])  # not built yet
        for optimizer in (sgd, adam):
            optimizer.apply_gradients([(tf.zeros(3), variables[0]), (tf.constant(gradient), variables[1])])
        self.assertAllClose([s.numpy() for s in keras_internals.optimizer_slots(sgd, variables[1])],
                            [-0.1 * gradient])
        self.assertAllClose(sorted(s.numpy().tolist() for s in keras_internals.optimizer_slots(adam, variables[1])),
                            sorted([(0.1 * gradient).tolist(), (0.001 * gradient ** 2).tolist()]))

    def test_track_trackable_makes_a_checkpoint_dependency(self):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        extra = keras.Variable(np.float32(1.0))
        holder = tf.Module()
        holder.value = extra
        keras_internals.track_trackable(model, holder, "extra_state")
        path = tf.train.Checkpoint(model=model).write(os.path.join(self.get_temp_dir(), "ckpt"))
        extra.assign(5.0)
        tf.train.Checkpoint(model=model).read(path).assert_existing_objects_matched()
        self.assertEqual(float(extra.numpy()), 1.0)

    def test_inbound_and_outbound_nodes(self):
        inputs = keras.Input((4,))
        first = keras.layers.Dense(3, name="first")
        second = keras.layers.Dense(2, name="second")
        keras.Model(inputs, second(first(inputs)))
        self.assertIs(keras_internals.inbound_nodes(second)[0].parent_nodes[0].operation, first)
        self.assertIs(keras_internals.outbound_nodes(first)[0].operation, second)
        self.assertEqual(keras_internals.inbound_nodes(keras.layers.Dense(2)), [])
        self.assertEqual(keras_internals.outbound_nodes(keras.layers.Dense(2)), [])

    def test_set_initial_epoch_moves_where_fit_starts(self):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        self.assertIsNone(keras_internals.initial_epoch(model))
        start = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: keras_internals.set_initial_epoch(model, 2))
        x, y = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)
        history = model.fit(x, y, epochs=4, verbose=0, callbacks=[start])
        self.assertEqual(history.epoch, [2, 3])
        self.assertEqual(keras_internals.initial_epoch(model), 2)
        keras_internals.set_initial_epoch(model, None)
        self.assertEqual(model.fit(x, y, epochs=2, verbose=0).epoch, [0, 1])


if __name__ == "__main__":
    tf.test.main()
