"""The test command's summary: tf.test.TestCase's inherited test_session stubs are not reported as skipped."""

import contextlib
import io
import os

import pytest
import tensorflow as tf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PytestSummaryTest(tf.test.TestCase):

    def test_no_skipped_test_session_stubs(self):
        # IdentifierTest: a few fast tests in a tf.test.TestCase, which inherits test_session. The session runs in
        # this process (as pytester's in-process runs do), with pyproject's addopts ("-q"): its summary line is
        # what the test command prints.
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exit_code = pytest.main(["-p", "no:warnings", "-p", "no:cacheprovider", "--capture=no", "-rs",
                                     "--rootdir", _ROOT, os.path.join(_ROOT, "tests/test_criteria.py::IdentifierTest")])
        output = output.getvalue()
        self.assertEqual(exit_code, 0, output[-3000:])
        self.assertRegex(output, r"(?m)^\d+ passed, 1 deselected in ")
        self.assertNotIn("skipped", output)
        self.assertNotIn("test_session", output)


if __name__ == "__main__":
    tf.test.main()
