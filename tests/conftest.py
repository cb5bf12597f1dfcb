"""Test setup: split the CPU into two logical devices so MirroredStrategy runs two replicas."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


def _is_test_session_stub(item):
    """Whether a collected item is tf.test.TestCase's inherited ``test_session`` (a deprecated context manager
    that pytest collects because of its name, then reports as skipped: "Not a test.")."""
    cls = getattr(item, "cls", None)
    return (item.name == "test_session" and cls is not None and issubclass(cls, tf.test.TestCase)
            and getattr(cls, "test_session", None) is tf.test.TestCase.test_session)


def pytest_collection_modifyitems(config, items):
    """Deselects the ``test_session`` stubs every tf.test.TestCase inherits, so the summary counts real tests only."""
    stubs = [item for item in items if _is_test_session_stub(item)]
    if stubs:
        items[:] = [item for item in items if not _is_test_session_stub(item)]
        config.hook.pytest_deselected(items=stubs)
