"""Tests of SharedDirectory: the file protocol in one process, and real processes grafting through a directory."""

import os
import subprocess
import sys
import threading
import time
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import _shared_dir_model as tiny
from keras_graft import grafting
from keras_graft import shared_directory as sd

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shared_dir_worker.py")


def simulate_ring(epochs):
    """The two workers' training and grafting, done in this process: final weights of rank 0 and rank 1."""
    models = [tiny.build_model(k) for k in range(2)]
    before = [tiny.build_model(k) for k in range(2)]  # the weights each rank published, before its graft
    grafters = [grafting.Grafter(m) for m in models]
    data = [tiny.training_data(k) for k in range(2)]
    for epoch in range(epochs):
        for model, (x, y) in zip(models, data):
            model.fit(x, y, initial_epoch=epoch, epochs=epoch + 1, **tiny.FIT_KWARGS)
        for copy, model in zip(before, models):
            copy.set_weights(model.get_weights())
        for k in range(2):
            grafters[k].graft_model(before[(k - 1) % 2])
    return [m.get_weights() for m in models]


class FakeClock:
    """Stands in for the time module: sleeping advances the clock at once and is recorded."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class SharedDirectoryTest(tf.test.TestCase, parameterized.TestCase):
    """One process; the test writes the other ranks' files itself."""

    def setUp(self):
        super().setUp()
        self.dir = self.get_temp_dir() + f"/shared_{self._testMethodName}"
        self.model = tiny.build_model(0)
        self.peer = tiny.build_model(1)

    def publish_as(self, rank, model, round_index, world_size=2):
        return sd.SharedDirectory(self.dir, rank, world_size).publish(model, round_index)

    def directory(self, rank=0, world_size=2, **kwargs):
        source = sd.SharedDirectory(self.dir, rank, world_size, **kwargs)
        source.setup(self.model)
        return source

    def assertWeightsEqual(self, expected, actual):
        self.assertEqual(len(expected), len(actual))
        for e, a in zip(expected, actual):
            self.assertAllEqual(e, a)

    def test_publish_writes_the_round_file_and_no_temporary_file(self):
        source = self.directory(rank=1, world_size=3)
        path = source.publish(self.model, 7)
        self.assertEqual(path, f"{self.dir}/round-000007-rank-1.weights.npz")
        self.assertEqual(os.listdir(self.dir), ["round-000007-rank-1.weights.npz"])
        with open(path, "rb") as f:
            paths, arrays = sd.decode_weights(f.read())
        self.assertEqual(paths, [w.path for w in self.model.weights])
        self.assertWeightsEqual(self.model.get_weights(), arrays)

    def test_file_is_plain_npz_without_pickle(self):
        path = self.directory().publish(self.model, 0)
        with np.load(path, allow_pickle=False) as archive:
            self.assertEqual(len(archive.files), len(self.model.weights) + 1)
            self.assertAllEqual(archive["w0"], self.model.weights[0].numpy())

    def test_grafts_the_ring_predecessor_like_the_in_process_graft(self):
        expected = tiny.build_model(0)
        grafting.Grafter(expected).graft_model(self.peer)
        self.publish_as(2, self.peer, 4, world_size=3)
        source = self.directory(rank=0, world_size=3)
        self.assertEqual(source.peer_rank, 2)
        results = source.graft_round(grafting.Grafter(self.model), 4)
        self.assertLen(results, 1)
        self.assertAllClose(results[0].alphas, grafting.Grafter(tiny.build_model(0)).graft_model(self.peer).alphas)
        self.assertWeightsEqual(expected.get_weights(), self.model.get_weights())

    def test_publishes_the_weights_before_its_own_graft(self):
        original = self.model.get_weights()
        self.publish_as(1, self.peer, 0)
        self.directory().graft_round(grafting.Grafter(self.model), 0)
        _, published = sd.SharedDirectory(self.dir, 1, 2).read_peer(0)
        self.assertWeightsEqual(original, published)

    @parameterized.named_parameters(
        ("truncated", lambda data: data[: len(data) // 2]),
        ("end_cut", lambda data: data[:-1]),
        ("corrupted", lambda data: data[:2000] + bytes(b ^ 0xFF for b in data[2000:2008]) + data[2008:]),
        ("empty", lambda data: b""),
        ("not_npz", lambda data: b"\x80\x04 a pickle? never."),
    )
    def test_damaged_file_is_not_read_and_times_out(self, damage):
        data = sd.encode_weights([w.path for w in self.peer.weights], self.peer.get_weights())
        with self.assertRaises(sd.UnreadableWeightsError):
            sd.decode_weights(damage(data))
        tf.io.gfile.makedirs(self.dir)
        with open(f"{self.dir}/round-000000-rank-1.weights.npz", "wb") as f:
            f.write(damage(data))
        original = self.model.get_weights()
        source = self.directory(timeout=0.3)
        with self.assertRaisesRegex(TimeoutError, r"rank 1 for round 0 .*round-000000-rank-1.*truncated or corrupt"):
            source.graft_round(grafting.Grafter(self.model), 0)
        self.assertWeightsEqual(original, self.model.get_weights())

    def test_damaged_file_is_retried_until_replaced(self):
        path = self.publish_as(1, self.peer, 0)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:100])
        writer = threading.Timer(0.3, sd.write_atomically, (path, data))
        writer.start()
        self.addCleanup(writer.join)
        result = self.directory(timeout=30).graft_round(grafting.Grafter(self.model), 0)
        self.assertLen(result, 1)

    def test_waits_for_a_file_written_later(self):
        writer = threading.Timer(0.3, self.publish_as, (1, self.peer, 0))
        writer.start()
        self.addCleanup(writer.join)
        self.directory(timeout=30).graft_round(grafting.Grafter(self.model), 0)
        self.assertNotAllClose(tiny.build_model(0).get_weights()[0], self.model.get_weights()[0])

    def test_mismatched_architecture_names_the_layer(self):
        other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(5, 3, use_bias=False, name="wide")])
        self.publish_as(1, other, 0)
        start = time.monotonic()
        with self.assertRaisesRegex(ValueError, r"round-000000-rank-1.*conv2d(_\d+)?/kernel' has shape \(3, 3, 1, 4\) "
                                                r"in the model but .*wide/kernel' has shape \(3, 3, 1, 5\)"):
            self.directory(timeout=60).graft_round(grafting.Grafter(self.model), 0)
        self.assertLess(time.monotonic() - start, 30)

    def test_keeps_the_last_rounds_and_deletes_only_its_own(self):
        rounds = [0, 2, 3, 7, 8]  # e.g. every_n_epochs > 1: rounds are epoch numbers, keep counts files
        source = self.directory(keep=2)
        grafter = grafting.Grafter(self.model)
        for r in rounds:
            self.publish_as(1, self.peer, r)
            source.graft_round(grafter, r)
        names = sorted(os.listdir(self.dir))
        own = [n for n in names if n.endswith("rank-0.weights.npz")]
        peer = [n for n in names if n.endswith("rank-1.weights.npz")]
        self.assertEqual(own, ["round-000007-rank-0.weights.npz", "round-000008-rank-0.weights.npz"])
        self.assertLen(peer, len(rounds))

    def test_keep_covers_the_ring_lag(self):
        self.assertEqual(sd.SharedDirectory(self.dir, 0, 2).keep, 2)
        self.assertEqual(sd.SharedDirectory(self.dir, 0, 5).keep, 4)
        with self.assertRaisesRegex(ValueError, "keep must be an integer >= world_size - 1 = 3"):
            sd.SharedDirectory(self.dir, 0, 4, keep=2)

    def test_timeout_backs_off_and_names_rank_round_and_path(self):
        clock = FakeClock()
        source = self.directory(timeout=600.0)
        with mock.patch.object(sd, "time", clock):
            with self.assertRaises(TimeoutError) as raised:
                source.read_peer(12)
        message = str(raised.exception)
        self.assertIn("rank 1 for round 12", message)
        self.assertIn(f"{self.dir}/round-000012-rank-1.weights.npz", message)
        self.assertIn("did not appear", message)
        self.assertAllClose(clock.sleeps[:7], [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
        self.assertLessEqual(max(clock.sleeps), 2.0)
        self.assertAllClose(sum(clock.sleeps), 600.0)
        self.assertLess(len(clock.sleeps), 310)  # 600 s at 2 s a poll, not a spin

    @parameterized.named_parameters(
        ("one_process", 0, 1, "world_size >= 2"),
        ("rank_too_large", 2, 2, r"rank must be an integer in \[0, 2\)"),
        ("negative_rank", -1, 2, r"rank must be"),
    )
    def test_invalid_ranks(self, rank, world_size, message):
        with self.assertRaisesRegex(ValueError, message):
            sd.SharedDirectory(self.dir, rank, world_size)

    @parameterized.named_parameters(
        ("path", dict(path=None), TypeError, "SharedDirectory: path must be a path .*got None"),
        ("empty_path", dict(path=""), ValueError, "SharedDirectory: path must be a non-empty path, got ''"),
        ("rank", dict(rank="0"), TypeError, "SharedDirectory: rank must be an integer, got '0'"),
        ("world_size", dict(world_size="2"), TypeError, "SharedDirectory: world_size must be an integer, got '2'"),
        ("timeout", dict(timeout="60"), TypeError, "SharedDirectory: timeout must be a number, got '60'"),
        ("poll_interval", dict(poll_interval=float("nan")), ValueError, "poll_interval must be a finite number > 0, "
                                                                         "got nan"),
        ("keep", dict(keep="all"), TypeError, "SharedDirectory: keep must be an integer, got 'all'"),
    )
    def test_arguments_are_named(self, override, error, message):
        kwargs = dict(dict(path=self.dir, rank=0, world_size=2), **override)
        with self.assertRaisesRegex(error, message):
            sd.SharedDirectory(**kwargs)

    def test_rounds_must_increase(self):
        self.publish_as(1, self.peer, 3)
        source = self.directory()
        grafter = grafting.Grafter(self.model)
        source.graft_round(grafter, 3)
        with self.assertRaisesRegex(ValueError, "already grafted round 3.*initial_epoch"):
            source.graft_round(grafter, 3)

    def test_resumed_round_overwrites_its_own_file(self):
        self.publish_as(0, self.peer, 5)  # left by the process before the restart
        self.publish_as(1, self.peer, 5)
        original = self.model.get_weights()
        self.directory().graft_round(grafting.Grafter(self.model), 5)
        _, published = sd.SharedDirectory(self.dir, 1, 2).read_peer(5)
        self.assertWeightsEqual(original, published)

    def test_setup_removes_only_its_own_temporary_files(self):
        tf.io.gfile.makedirs(self.dir)
        own = f"{self.dir}/.round-000001-rank-0.weights.npz.tmp-abc"
        other = f"{self.dir}/.round-000001-rank-1.weights.npz.tmp-abc"
        for path in (own, other):
            with open(path, "wb") as f:
                f.write(b"partial")
        self.directory()
        self.assertEqual(os.listdir(self.dir), [os.path.basename(other)])

    def test_bfloat16_weights_are_stored_as_float32(self):
        def dense():
            return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16")])

        model, peer = dense(), dense()
        sd.SharedDirectory(self.dir, 1, 2).publish(peer, 0)
        paths, arrays = sd.SharedDirectory(self.dir, 0, 2).read_peer(0)
        self.assertEqual(arrays[0].dtype, np.float32)
        self.assertAllEqual(arrays[0], peer.weights[0].numpy().astype(np.float32))
        grafting.Grafter(model).graft_arrays(arrays)
        self.assertEqual(model.weights[0].dtype, "bfloat16")


class ProcessesTest(tf.test.TestCase):
    """Real processes, each training with model.fit and grafting through a temporary directory."""

    def setUp(self):
        super().setUp()
        self.root = self.get_temp_dir() + f"/{self._testMethodName}"
        self.dir = f"{self.root}/shared"
        os.makedirs(self.root, exist_ok=True)
        self.processes = []
        self.addCleanup(self.stop_processes)

    def stop_processes(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def start(self, rank, *flags):
        log = open(f"{self.root}/rank{rank}-{len(self.processes)}.log", "w")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, WORKER, f"--dir={self.dir}", f"--out={self.root}", f"--rank={rank}", *flags],
            stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log.name
        self.processes.append(process)
        return process

    def finish(self, process, timeout=120):
        rc = process.wait(timeout=timeout)
        with open(process.log_path) as f:
            return rc, f.read()

    def weights(self, rank, epoch):
        with np.load(f"{self.root}/rank{rank}-epoch{epoch}.npz", allow_pickle=False) as archive:
            return [archive[f"arr_{i}"] for i in range(len(archive.files))]

    def assertFinished(self, process):
        rc, log = self.finish(process)
        self.assertEqual(rc, 0, log)

    def assertMatchesInProcessRing(self, epochs):
        expected = simulate_ring(epochs)
        final = [self.weights(k, epochs - 1) for k in range(2)]
        for k in range(2):
            self.assertAllClose(expected[k], final[k], rtol=1e-5, atol=1e-6)
        self.assertAllClose(final[0], final[1], rtol=1e-5, atol=1e-6)  # two ranks end a round equal

    def test_two_processes_graft_like_the_in_process_ring(self):
        ranks = [self.start(k, "--epochs=3") for k in range(2)]
        for process in ranks:
            self.assertFinished(process)
        self.assertMatchesInProcessRing(3)
        self.assertEqual(sorted(os.listdir(self.dir)),
                         [f"round-00000{r}-rank-{k}.weights.npz" for r in (1, 2) for k in (0, 1)])

    def test_restarted_process_resumes_at_its_round(self):
        backup = [f"--backup_dir={self.root}/backup", f"--crash_marker={self.root}/crashed"]
        rank0 = self.start(0, "--epochs=3")
        rank1 = self.start(1, "--epochs=3", "--crash_in_epoch=1", *backup)
        rc, log = self.finish(rank1)
        self.assertEqual(rc, 3, log)
        self.assertTrue(os.path.exists(f"{self.root}/crashed"))
        self.assertFinished(self.start(1, "--epochs=3", "--crash_in_epoch=1", *backup))
        self.assertFinished(rank0)
        self.assertMatchesInProcessRing(3)  # no round lost, none grafted twice

    def test_killed_peer_stops_the_other_with_a_timeout(self):
        # Rank 1 (one device) grafts round 0 and dies; rank 0 (MirroredStrategy on two devices) starts once rank 1's
        # round-0 file exists, so its short timeout only runs against the dead peer.
        rank1 = self.start(1, "--exit_after_epoch=0")
        first_file = f"{self.dir}/round-000000-rank-1.weights.npz"
        deadline = time.monotonic() + 120
        while not os.path.exists(first_file) and time.monotonic() < deadline and rank1.poll() is None:
            time.sleep(0.1)
        rank0 = self.start(0, "--timeout=5", "--strategy=mirrored")
        rc, log = self.finish(rank1)
        self.assertEqual(rc, 4, log)
        died = time.monotonic()
        rc, log = self.finish(rank0)
        self.assertLess(time.monotonic() - died, 5 + 20)
        self.assertNotEqual(rc, 0)
        self.assertRegex(log, r"TimeoutError: SharedDirectory rank 0: timed out after 5 s waiting for the weights of "
                              r"rank 1 for round 1 at .*/shared/round-000001-rank-1\.weights\.npz")
        # Round 0 went through across the two strategies: both ranks ended it with equal weights.
        self.assertAllClose(self.weights(0, 0), self.weights(1, 0), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
