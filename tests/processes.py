"""Test processes: a Python script run as ``python script.py args`` runs it, in a process of its own, forked from a
server process that has imported TensorFlow, Keras and keras_graft once (about 9 s of CPU saved per process).

This module imports none of them itself: the server does, and the forked process runs the script from there.
"""

import functools
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile

# Importing these takes about 9 s of CPU per process on a 2-core machine, more than most test processes then spend
# training; the server imports them but does not initialise TensorFlow, so a script still chooses its devices.
_PRELOADED = ["tensorflow", "keras", "keras_graft"]


@functools.lru_cache(maxsize=None)
def _forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOADED)
    return context


def _run_as_main(path, args, environment, cwd, stdout, stderr):
    """In the new process: what ``cd cwd && env ... python path args > stdout 2> stderr`` does."""
    os.environ.clear()
    os.environ.update(environment)
    tempfile.tempdir = None  # TMPDIR as the environment sets it, not as the server process found it
    os.chdir(cwd)
    for fd, name in ((1, stdout), (2, stderr)):
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name="__main__")


class PythonProcess:
    """A Python script run as ``python path args`` runs it, in a process of its own forked from the server (a
    ``subprocess.Popen`` subset: ``pid``, ``poll``, ``wait``, ``kill``, ``returncode``).

    stdout and stderr go to files (``stderr=subprocess.STDOUT``: the same file); ``output()`` reads them.
    """

    def __init__(self, path, args=(), env=None, cwd=None, stdout=None, stderr=None):
        if stdout is None:
            handle, stdout = tempfile.mkstemp(prefix="python_process_", suffix=".out")
            os.close(handle)
        if stderr is None:
            handle, stderr = tempfile.mkstemp(prefix="python_process_", suffix=".err")
            os.close(handle)
        self.stdout_path = stdout
        self.stderr_path = stdout if stderr == subprocess.STDOUT else stderr
        self._process = _forkserver().Process(
            target=_run_as_main, args=(os.path.abspath(path), [str(a) for a in args], dict(env or os.environ),
                                       os.path.abspath(cwd or os.getcwd()), self.stdout_path, self.stderr_path))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self):
        return self._process.exitcode

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self._process.exitcode

    def kill(self):
        self._process.kill()

    def output(self):
        """(stdout, stderr) as text; the same text twice when both went to one file."""
        def read(name):
            with open(name, errors="replace") as f:
                return f.read()
        return read(self.stdout_path), read(self.stderr_path)


def run(path, args=(), env=None, cwd=None, timeout=300):
    """Runs a script as a :class:`PythonProcess` to its end; returns a ``subprocess.CompletedProcess`` with text
    output. A run past ``timeout`` seconds is killed and raises ``subprocess.TimeoutExpired``."""
    process = PythonProcess(path, args, env=env, cwd=cwd)
    try:
        returncode = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    stdout, stderr = process.output()
    for name in {process.stdout_path, process.stderr_path}:
        os.remove(name)
    return subprocess.CompletedProcess([sys.executable, path, *args], returncode, stdout, stderr)
