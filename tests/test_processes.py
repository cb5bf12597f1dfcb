"""tests/processes.py: a script run from the preloaded server behaves as ``python script.py args`` would."""
import json
import os
import subprocess
import sys
import textwrap

import tensorflow as tf

import processes

_SCRIPT = textwrap.dedent("""\
    import json, os, sys, tempfile
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]  # TensorFlow is imported, not initialised: devices can change
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "path0": sys.path[0],
                      "tmp": tempfile.gettempdir(), "var": os.environ.get("PROCESSES_TEST"),
                      "cpus": len(tf.config.list_logical_devices("CPU")), "preloaded": "keras_graft" in sys.modules}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
""")


class PythonProcessTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.get_temp_dir()
        self.script = os.path.join(self.dir, "script.py")
        with open(self.script, "w") as f:
            f.write(_SCRIPT)

    def test_runs_like_a_new_interpreter(self):
        scratch = os.path.join(self.dir, "scratch")
        os.makedirs(scratch)
        env = dict(os.environ, PROCESSES_TEST="yes", TMPDIR=scratch)
        result = processes.run(self.script, [5, "x"], env=env, cwd=scratch)
        self.assertEqual(result.returncode, 5, result.stderr)
        self.assertTrue(result.stderr.endswith("to stderr\n"), result.stderr)  # after TensorFlow's own lines
        self.assertEqual(json.loads(result.stdout), {
            "argv": [self.script, "5", "x"], "cwd": scratch, "name": "__main__", "path0": self.dir, "tmp": scratch,
            "var": "yes", "cpus": 3, "preloaded": True})

    def test_kill_and_shared_output_file(self):
        log = os.path.join(self.dir, "log.txt")
        with open(self.script, "w") as f:
            f.write("import sys, time\nprint('started', flush=True)\nprint('err', file=sys.stderr, flush=True)\n"
                    "time.sleep(600)\n")
        process = processes.PythonProcess(self.script, stdout=log, stderr=subprocess.STDOUT)
        self.assertIsNone(process.poll())
        with self.assertRaises(subprocess.TimeoutExpired):
            process.wait(timeout=2)
        process.kill()
        self.assertEqual(process.wait(timeout=60), -9)
        self.assertEqual(process.returncode, -9)
        stdout, stderr = process.output()
        self.assertEqual(stdout, "started\nerr\n")
        self.assertEqual(stderr, stdout)

    def test_timeout_kills_the_process(self):
        with open(self.script, "w") as f:
            f.write("import time\ntime.sleep(600)\n")
        with self.assertRaises(subprocess.TimeoutExpired):
            processes.run(self.script, timeout=1)

    def test_uncaught_exception_exits_with_1_and_a_traceback(self):
        with open(self.script, "w") as f:
            f.write("raise ValueError('broken script')\n")
        result = processes.run(self.script)
        self.assertEqual(result.returncode, 1)
        self.assertIn("ValueError: broken script", result.stderr)
        self.assertIn(sys.executable, result.args)


if __name__ == "__main__":
    tf.test.main()
