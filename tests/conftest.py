"""Test setup: testing_utils splits the CPU into two logical devices so MirroredStrategy runs two replicas; the
inherited test_session stubs of tf.test.TestCase are deselected."""
import tensorflow as tf

import testing_utils  # noqa: F401  (splits the CPU before any test runs)

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
