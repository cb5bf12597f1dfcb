"""The test command's summary: tf.test.TestCase's inherited test_session stubs are not reported as skipped."""

import os
import subprocess
import sys

import tensorflow as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PytestSummaryTest(tf.test.TestCase):

    def test_no_skipped_test_session_stubs(self):
        # IdentifierTest: a few fast tests in a tf.test.TestCase, which inherits test_session.
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:warnings", "-p", "no:cacheprovider", "-rs",
             "tests/test_criteria.py::IdentifierTest"],
            cwd=_ROOT, capture_output=True, text=True, timeout=300,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=_ROOT))
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        # The summary line (pyproject's addopts make the run quiet: "-q").
        self.assertRegex(result.stdout, r"(?m)^\d+ passed, 1 deselected in ")
        self.assertNotIn("skipped", result.stdout)
        self.assertNotIn("test_session", result.stdout)


if __name__ == "__main__":
    tf.test.main()
