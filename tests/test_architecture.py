"""The package's layers (BUILD.md, Architecture): a module imports only modules of its own layer or below."""
import ast
import os

import tensorflow as tf

import testing_utils  # noqa: F401  (splits the CPU, as every test file)

_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_graft")

# Lowest first; models/ and datasets.py stand beside the core, which never imports them.
LAYERS = (
    {"checks", "keras_internals", "layouts", "criteria", "groups", "grafting"},
    {"config", "rounds", "peers", "shared_directory", "scions", "steps", "distillation", "schedules", "strategies"},
    {"callbacks", "ensemble", "trainer", "reactivation"},
    {"experiment"},
)
BESIDE = {"models", "datasets"}


def layer_of(module):
    for index, layer in enumerate(LAYERS):
        if module in layer:
            return index
    return None


def imported_modules(path):
    """keras_graft modules a source file imports (``from keras_graft import x``, ``from keras_graft.x import y``,
    ``import keras_graft.x``)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "keras_graft":
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("keras_graft."))
    return found


class ArchitectureTest(tf.test.TestCase):

    def test_every_core_module_has_a_layer(self):
        modules = {name[:-3] for name in os.listdir(_PACKAGE) if name.endswith(".py") and name != "__init__.py"}
        modules |= {name for name in os.listdir(_PACKAGE) if os.path.isdir(os.path.join(_PACKAGE, name))
                    and not name.startswith("__")}
        self.assertEqual(sorted(m for m in modules if layer_of(m) is None and m not in BESIDE), [])

    def test_modules_import_only_their_layer_or_below(self):
        violations = []
        for index, layer in enumerate(LAYERS):
            for module in layer:
                path = os.path.join(_PACKAGE, module + ".py")
                if not os.path.exists(path):
                    path = os.path.join(_PACKAGE, module, "__init__.py")
                for imported in imported_modules(path):
                    if imported in BESIDE and index < len(LAYERS) - 1:
                        violations.append(f"{module} imports {imported} (the core never imports it)")
                    elif imported not in BESIDE and (layer_of(imported) is None or layer_of(imported) > index):
                        violations.append(f"{module} (layer {index}) imports {imported} (layer {layer_of(imported)})")
        self.assertEqual(violations, [])

    def test_the_checker_sees_a_violation(self):
        path = os.path.join(self.get_temp_dir(), "bad.py")
        with open(path, "w") as f:
            f.write("from keras_graft import trainer\nimport keras_graft.models\nfrom keras_graft.callbacks import x\n")
        self.assertEqual(imported_modules(path), {"trainer", "models", "callbacks"})


if __name__ == "__main__":
    tf.test.main()
