"""Test setup: testing_utils splits the CPU into two logical devices so MirroredStrategy runs two replicas; the
inherited test_session stubs of tf.test.TestCase are deselected; the slowest classes are collected first, so that
parallel workers (pytest -n) start them early and finish together."""
import gc
import os


def _is_test_session_stub(item):
    """Whether a collected item is tf.test.TestCase's inherited ``test_session`` (a deprecated context manager
    that pytest collects because of its name, then reports as skipped: "Not a test.")."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (imported already by the test modules)

    cls = getattr(item, "cls", None)
    return (item.name == "test_session" and cls is not None and issubclass(cls, tf.test.TestCase)
            and getattr(cls, "test_session", None) is tf.test.TestCase.test_session)


# The classes that take longest (they start processes or train end to end), slowest first: pytest-xdist's
# loadscope hands each class to one worker, so the long ones must start early.
SLOW_FIRST = (
    "test_readme.py::ReadmeTest",
    "test_shared_directory.py::KillPointsTest",
    "test_trainer.py::TrainerTest",
    "test_benchmarks.py::AccuracyStudySmokeTest",
    "test_examples.py::TrainScriptTest",
    "test_examples.py::ScriptProcessTest",
    "test_examples.py::TrainMethodsTest",
    "test_reactivation.py::CheckpointTest",
    "test_callbacks.py::GraftingCallbackTest",
    "test_distillation.py::CultivationTest",
    "test_ensemble.py::GraftingTest",
    "test_trainer.py::BackupTest",
    "test_examples.py::QuickstartScriptTest",
    "test_models.py::ModelsTest",
    "test_shared_directory.py::SharedDirectoryTest",
    "test_ensemble.py::TrainingTest",
    "test_trainer.py::KilledProcessTest",
    "test_shared_directory.py::DeadPeerTest",
    "test_trainer_multiworker.py::MultiWorkerTest",
)


def _slow_rank(item):
    scope = f"{item.path.name}::{item.cls.__name__}" if getattr(item, "cls", None) else item.path.name
    return SLOW_FIRST.index(scope) if scope in SLOW_FIRST else len(SLOW_FIRST)


def pytest_configure(config):
    """Splits the CPU in every process that runs tests (not in pytest-xdist's controller, which runs none: it
    skips importing TensorFlow). Keeps the collection order for ``--dist loadscope``: pytest-xdist otherwise hands
    out the classes with the most tests first, which leaves the slow single-test classes (the README, the kill
    points) to the end."""
    controller = getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")
    if not controller:
        import testing_utils  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_xdist_auto_num_workers(config):
    """Workers for ``pytest -n auto``: one per core the process may use. The process tests fork from a server that
    imported TensorFlow (tests/processes.py), so they no longer leave cores idle while they start: on 2 cores, 2
    workers took 7.6 min and 814 CPU-s, 3 workers 7.9 min and 912 CPU-s (each worker imports TensorFlow)."""
    return max(1, len(os.sched_getaffinity(0)))


def pytest_collection_modifyitems(config, items):
    """Deselects the ``test_session`` stubs every tf.test.TestCase inherits, so the summary counts real tests only,
    and puts the slow classes first (a stable sort: the rest keep their order)."""
    stubs = [item for item in items if _is_test_session_stub(item)]
    if stubs:
        items[:] = [item for item in items if not _is_test_session_stub(item)]
        config.hook.pytest_deselected(items=stubs)
    items.sort(key=_slow_rank)


def pytest_collection_finish(session):
    """Leaves the objects alive after collection (TensorFlow's and Keras' modules, the test modules) out of Python's
    cyclic garbage collections, and runs the youngest generation's collection every 50,000 allocations instead of
    700: tracing tf.functions allocates millions of objects, and on 2 cores the suite ran 5-10% faster."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
