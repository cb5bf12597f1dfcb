"""Tests of SharedDirectory: the file protocol in one process, and real processes grafting through a directory."""

import contextlib
import io
import json
import os
import re
import subprocess
import threading
import time
import tracemalloc
import zipfile
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import _shared_dir_model as tiny
import processes
from keras_graft import grafting
from keras_graft import shared_directory as sd

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shared_dir_worker.py")


def simulate_ring(world_size, epochs):
    """The workers' training and grafting, done in this process: every rank's final weights.

    The reference protocol: the round after epoch e opens epoch e + 1; no round follows the final epoch.
    """
    models = [tiny.build_model(k) for k in range(world_size)]
    before = [tiny.build_model(k) for k in range(world_size)]  # the weights each rank published, before its graft
    grafters = [grafting.Grafter(m) for m in models]
    data = [tiny.training_data(k) for k in range(world_size)]
    for epoch in range(epochs):
        for model, (x, y) in zip(models, data):
            model.fit(x, y, initial_epoch=epoch, epochs=epoch + 1, **tiny.FIT_KWARGS)
        if epoch == epochs - 1:
            break
        for copy, model in zip(before, models):
            copy.set_weights(model.get_weights())
        for k in range(world_size):
            grafters[k].graft_model(before[(k - 1) % world_size])
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

    def publish_as(self, rank, model, round_index, world_size=2, loss=None):
        source = sd.SharedDirectory(self.dir, rank, world_size)
        if loss is not None:
            source.record_epoch(round_index, {"loss": loss})
        return source.publish(model, round_index)

    def directory(self, rank=0, world_size=2, **kwargs):
        kwargs.setdefault("lease_interval", 0.1)
        source = sd.SharedDirectory(self.dir, rank, world_size, **kwargs)
        source.setup(self.model)
        self.addCleanup(source.close)
        return source

    def assertWeightsEqual(self, expected, actual):
        self.assertEqual(len(expected), len(actual))
        for e, a in zip(expected, actual):
            self.assertAllEqual(e, a)

    def test_publish_writes_the_round_file_and_no_temporary_file(self):
        source = self.directory(rank=1, world_size=3)
        path = source.publish(self.model, 7)
        self.assertEqual(path, f"{self.dir}/round-000007-rank-1.weights.npz")
        self.assertEqual(sorted(os.listdir(self.dir)), ["rank-1.lease", "round-000007-rank-1.weights.npz", "run.json"])
        with open(path, "rb") as f:
            paths, arrays = sd.decode_weights(f.read())
        self.assertEqual(paths, [w.path for w in self.model.weights])
        self.assertWeightsEqual(self.model.get_weights(), arrays)

    def test_file_is_plain_npz_without_pickle(self):
        path = self.directory().publish(self.model, 0)
        with np.load(path, allow_pickle=False) as archive:
            self.assertEqual(len(archive.files), len(self.model.weights) + 2)  # + paths and meta
            self.assertAllEqual(archive["w0"], self.model.weights[0].numpy())
            meta = json.loads(str(archive["meta"]))
        self.assertEqual(meta["rank"], 0)
        self.assertEqual(meta["round"], 0)

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

    # Damaged and malformed files.

    def write_peer_file(self, data, rank=1, round_index=0):
        tf.io.gfile.makedirs(self.dir)
        path = f"{self.dir}/round-{round_index:06d}-rank-{rank}.weights.npz"
        with open(path, "wb") as f:
            f.write(data)
        return path

    def peer_bytes(self, arrays=None, paths=None, meta=None, **members):
        """A peer file of round 0 as rank 1 of this run would write it, with the given parts replaced."""
        source = sd.SharedDirectory(self.dir, 1, 2)
        source._join_run()
        values = {"meta": np.asarray(json.dumps({"format": sd.FORMAT, **source._meta("round", round=0, epoch=0),
                                                 **(meta or {})})),
                  "paths": np.asarray(paths if paths is not None else [w.path for w in self.peer.weights])}
        for i, array in enumerate(arrays if arrays is not None else self.peer.get_weights()):
            values[f"w{i}"] = array
        values.update(members)
        buffer = io.BytesIO()
        np.savez(buffer, **values)
        return buffer.getvalue()

    @parameterized.named_parameters(
        ("truncated", lambda data: data[: len(data) // 2]),
        ("end_cut", lambda data: data[:-1]),
        ("corrupted", lambda data: data[:2000] + bytes(b ^ 0xFF for b in data[2000:2008]) + data[2008:]),
        ("empty", lambda data: b""),
        ("not_npz", lambda data: b"\x80\x04 a pickle? never."),
        ("plain_npy", lambda data: _npy_bytes(np.zeros(3, np.float32))),
    )
    def test_damaged_file_is_refused_naming_the_file(self, damage):
        data = sd.encode_weights([w.path for w in self.peer.weights], self.peer.get_weights())
        with self.assertRaises(sd.UnreadableWeightsError):
            sd.decode_weights(damage(data))
        source = self.directory(timeout=60, bad_file_grace=0.3)
        path = self.write_peer_file(damage(self.peer_bytes()))
        original = self.model.get_weights()
        start = time.monotonic()
        with self.assertRaisesRegex(sd.UnreadableWeightsError,
                                    rf"{re.escape(path)}: .*unchanged for 0.3 s.*rank 1 for round 0"):
            source.graft_round(grafting.Grafter(self.model), 0)
        self.assertLess(time.monotonic() - start, 20)  # not the whole timeout
        self.assertWeightsEqual(original, self.model.get_weights())

    def test_damaged_file_times_out_when_the_timeout_is_shorter(self):
        self.write_peer_file(self.peer_bytes()[:100])
        source = self.directory(timeout=0.3)
        with self.assertRaisesRegex(TimeoutError, r"rank 1 for round 0 .*round-000000-rank-1.*truncated or corrupt"):
            source.graft_round(grafting.Grafter(self.model), 0)

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

    @parameterized.named_parameters(
        ("int32", lambda w: w.astype(np.int32), "dtype int32"),
        ("bool", lambda w: w > 0, "dtype bool"),
        ("complex", lambda w: w.astype(np.complex64), "dtype complex64"),
        ("float16", lambda w: w.astype(np.float16), "dtype float16, the model's weight is stored as float32"),
        ("float64", lambda w: w.astype(np.float64), "dtype float64"),
        ("numeric_strings", lambda w: w.astype(str), "dtype <U"),
        ("big_endian", lambda w: w.astype(">f4"), "dtype >f4"),
    )
    def test_wrong_dtype_is_refused_at_once(self, convert, message):
        arrays = self.peer.get_weights()
        arrays[0] = convert(arrays[0])
        path = self.write_peer_file(self.peer_bytes(arrays=arrays))
        source = self.directory(timeout=60)
        with self.assertRaisesRegex(sd.InvalidWeightsError, rf"{re.escape(path)}: array w0 .*{re.escape(message)}"):
            source.graft_round(grafting.Grafter(self.model), 0)

    @parameterized.named_parameters(
        ("zero_d_paths", dict(paths="one path"), r"member 'paths' must be a 1-d array of strings"),
        ("paths_of_numbers", dict(paths=np.arange(10)), r"member 'paths' must be a 1-d array of strings"),
        ("too_few_paths", dict(paths=["a"]), r"'paths' names 1 weights but the file holds 9 arrays"),
        ("extra_member", dict(extra=np.zeros(1)), r"unexpected member 'extra.npy'"),
        ("gap_in_numbers", dict(w12=np.zeros(1)), r"not numbered consecutively"),
        ("object_array", dict(s0=np.zeros(1), state_paths=np.asarray(["x"]), w0=None), r"Python objects|dtype"),
        ("another_run", dict(meta={"run_id": "an-old-run"}), r"written by run 'an-old-run', but this is run '\w+' "
                                                             r".*another run"),
        ("another_round", dict(meta={"round": 3}), r"meta says round=3, the file name round=0"),
        ("meta_not_json", dict(meta_raw="{not json"), r"member 'meta' is not JSON"),
        ("old_format", dict(meta_raw=None), r"no member 'meta'"),
    )
    def test_malformed_file_is_refused_at_once(self, change, message):
        change = dict(change)
        meta_raw = change.pop("meta_raw", "unset")
        if change.get("w0", 0) is None:
            change["w0"] = np.array([{"a": 1}], dtype=object)
        data = self.peer_bytes(paths=change.pop("paths", None), meta=change.pop("meta", None), **change)
        if meta_raw != "unset":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != "meta.npy"}
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                for name, member in members.items():
                    archive.writestr(name, member)
                if meta_raw is not None:
                    archive.writestr("meta.npy", _npy_bytes(np.asarray(meta_raw)))
            data = buffer.getvalue()
        path = self.write_peer_file(data)
        source = self.directory(timeout=60)
        start = time.monotonic()
        with self.assertRaisesRegex(sd.InvalidWeightsError, rf"{re.escape(path)}: .*{message}"):
            source.graft_round(grafting.Grafter(self.model), 0)
        self.assertLess(time.monotonic() - start, 10)

    def test_small_file_announcing_a_huge_array_is_refused_before_reading_it(self):
        # 64 MiB of zeros deflate to a few dozen KiB; the header's shape is refused before any of it is read.
        arrays = self.peer.get_weights()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            with zipfile.ZipFile(io.BytesIO(self.peer_bytes())) as good:
                for info in good.infolist():
                    if info.filename != "w0.npy":
                        archive.writestr(info.filename, good.read(info))
            archive.writestr("w0.npy", _npy_bytes(np.zeros(16 << 20, np.float32)))
        self.assertLess(len(buffer.getvalue()), 1 << 20)
        path = self.write_peer_file(buffer.getvalue())
        source = self.directory(timeout=60)
        tracemalloc.start()
        try:
            with self.assertRaisesRegex(sd.InvalidWeightsError,
                                        rf"{re.escape(path)}: .*has shape \(3, 3, 1, 4\) in the model but .* has "
                                        r"shape \(16777216,\)"):
                source.graft_round(grafting.Grafter(self.model), 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 8 << 20)
        del arrays

    @parameterized.named_parameters(("fifo", "a FIFO"), ("directory", "a directory"),
                                    ("device", "a character device"))
    def test_only_regular_files_are_opened(self, kind):
        tf.io.gfile.makedirs(self.dir)
        path = f"{self.dir}/round-000000-rank-1.weights.npz"
        if kind == "a FIFO":
            os.mkfifo(path)  # opening it for reading would block forever without a writer
        elif kind == "a directory":
            os.mkdir(path)
        else:
            os.symlink("/dev/zero", path)
        source = self.directory(timeout=60)
        start = time.monotonic()
        with self.assertRaisesRegex(sd.InvalidWeightsError, rf"{re.escape(path)}: {kind}, not a regular file"):
            source.graft_round(grafting.Grafter(self.model), 0)
        self.assertLess(time.monotonic() - start, 10)

    def test_mismatched_architecture_names_the_layer(self):
        other = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(5, 3, use_bias=False, name="wide")])
        self.publish_as(1, other, 0)
        start = time.monotonic()
        with self.assertRaisesRegex(ValueError, r"round-000000-rank-1.*conv2d(_\d+)?/kernel' has shape \(3, 3, 1, 4\) "
                                                r"in the model but .*wide/kernel' has shape \(3, 3, 1, 5\)"):
            self.directory(timeout=60).graft_round(grafting.Grafter(self.model), 0)
        self.assertLess(time.monotonic() - start, 30)

    # Runs and ranks.

    def test_another_run_or_world_size_is_refused_at_setup(self):
        self.directory(run_id="run-a")
        with self.assertRaisesRegex(ValueError, r"holds run 'run-a' .*run.json.*this process belongs to run 'run-b'"):
            self.directory(rank=1, run_id="run-b")
        with self.assertRaisesRegex(ValueError, r"world_size=2 .*this process world_size=3"):
            self.directory(rank=1, world_size=3)
        self.directory(rank=1, run_id="run-a")  # the same run joins

    def test_a_rank_claimed_twice_is_detected(self):
        self.directory(rank=1)
        with self.assertRaisesRegex(sd.RankConflictError, r"rank 1 .* is held by another running process"):
            self.directory(rank=1)

    def test_a_stale_claim_is_taken_over(self):
        tf.io.gfile.makedirs(self.dir)
        with open(f"{self.dir}/rank-1.lease", "w") as f:  # left by a killed process: never renewed
            json.dump({"token": "dead", "beat": 7, "interval": 0.1, "host": "h", "pid": 1}, f)
        self.directory(rank=1)

    def test_the_process_that_lost_its_claim_stops_at_the_next_round(self):
        source = self.directory(rank=0)
        sd.write_atomically(source.lease_filename(), json.dumps({"token": "intruder", "interval": 0.1}).encode())
        time.sleep(0.5)
        self.publish_as(1, self.peer, 0)
        with self.assertRaisesRegex(sd.RankConflictError, r"rank 0 .* was claimed by another process"):
            source.graft_round(grafting.Grafter(self.model), 0)

    # Health.

    @parameterized.named_parameters(
        ("exploded", 1.0, 1e6, False),
        ("nan", 1.0, float("nan"), False),
        ("inf", 1.0, float("inf"), False),
        ("somewhat_worse", 1.0, 5.0, True),
        ("better", 5.0, 1.0, True),
    )
    def test_unhealthy_peer_is_not_grafted(self, own_loss, peer_loss, grafted):
        self.publish_as(1, self.peer, 0, loss=peer_loss)
        source = self.directory()
        source.record_epoch(0, {"loss": own_loss})
        original = self.model.get_weights()
        with self.assertLogs(level="WARNING") if not grafted else contextlib.nullcontext() as logs:
            results = source.graft_round(grafting.Grafter(self.model), 0)
        if grafted:
            self.assertNotAllClose(original[0], self.model.get_weights()[0])
            self.assertEqual(results[0].logs()["graft_skipped_layers"], 0)
        else:
            self.assertWeightsEqual(original, self.model.get_weights())
            self.assertEqual(results[0].logs()["graft_layers"], 0)
            self.assertRegex("\n".join(logs.output), r"round 0: rank 1 is unhealthy")
        _, published = sd.SharedDirectory(self.dir, 1, 2).read_peer(0)
        with np.load(source.filename(0), allow_pickle=False) as archive:
            self.assertEqual(json.loads(str(archive["meta"]))["loss"], own_loss)

    # Resuming.

    def compiled(self, rank, optimizer="sgd"):
        model = tiny.build_model(rank)
        model.compile(optimizer=keras.optimizers.get(optimizer), loss=model.loss)
        x, y = tiny.training_data(rank)
        model.fit(x, y, epochs=1, **tiny.FIT_KWARGS)  # builds and moves the optimizer state
        return model

    def test_resume_restores_the_published_state_and_does_not_publish_again(self):
        model = self.compiled(0)
        source = self.directory()
        self.assertIsNone(source.restore(model, model, epochs=5))
        source.record_epoch(3, {"loss": 1.5})
        self.publish_as(1, self.peer, 3)
        before = model.get_weights()
        optimizer_state = [v.numpy() for v in model.optimizer.variables]
        source.graft_round(grafting.Grafter(model), 3)
        grafted = model.get_weights()
        source.close()
        published_at = os.stat(source.filename(3)).st_mtime_ns

        restarted = tiny.build_model(0)
        restarted.compile(optimizer="sgd", loss=restarted.loss)
        again = self.directory()
        point = again.restore(restarted, restarted, epochs=5)
        self.assertEqual((point.start_epoch, point.last_epoch, point.round_done), (4, 3, False))
        self.assertWeightsEqual(before, restarted.get_weights())
        self.assertWeightsEqual(optimizer_state, [v.numpy() for v in restarted.optimizer.variables])
        again.graft_round(grafting.Grafter(restarted), 3)
        self.assertWeightsEqual(grafted, restarted.get_weights())
        self.assertEqual(os.stat(source.filename(3)).st_mtime_ns, published_at)

    def test_resume_skips_a_damaged_newest_file_with_a_warning(self):
        model = self.compiled(0)
        source = self.directory()
        source.restore(model, model, epochs=5)
        for r in (0, 1):
            self.publish_as(1, self.peer, r)
            source.graft_round(grafting.Grafter(model), r)
        with open(source.filename(1), "r+b") as f:
            f.truncate(500)
        restarted = self.compiled(0)
        source.close()
        with self.assertLogs(level="WARNING") as logs:
            point = self.directory().restore(restarted, restarted, epochs=5)
        self.assertEqual(point.start_epoch, 1)
        self.assertRegex("\n".join(logs.output), r"cannot resume from .*round-000001-rank-0.weights.npz")

    def test_resume_with_another_optimizer_is_refused(self):
        model = self.compiled(0)
        source = self.directory()
        source.restore(model, model, epochs=5)
        source.publish(model, 0)
        adam = self.compiled(0, optimizer="adam")
        source.close()
        with self.assertRaisesRegex(sd.InvalidWeightsError, r"round-000000-rank-0.weights.npz: the training state "
                                                            r"holds 2 variables .*has \d+ .*another optimizer"):
            self.directory().restore(adam, adam, epochs=5)

    def test_a_finished_rank_restarts_as_a_no_op(self):
        model = self.compiled(0)
        source = self.directory()
        source.restore(model, model, epochs=3)
        source.finish(model, 2, False)
        restarted = self.compiled(0)
        again = self.directory()
        with self.assertLogs(level="WARNING") as logs:
            point = again.restore(restarted, restarted, epochs=3)
        self.assertEqual((point.start_epoch, point.round_done), (3, True))
        self.assertWeightsEqual(model.get_weights(), restarted.get_weights())
        self.assertRegex("\n".join(logs.output), "already finished this run")
        again.close()
        longer = self.directory().restore(self.compiled(0), None, epochs=6)
        self.assertEqual((longer.start_epoch, longer.round_done), (3, False))  # continues, round 2 still to run

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
        ("one_process", 0, 1, {}, "world_size >= 2"),
        ("rank_too_large", 2, 2, {}, r"rank must be an integer in \[0, 2\)"),
        ("negative_rank", -1, 2, {}, r"rank must be"),
        ("run_id", 0, 2, {"run_id": "a/b"}, r"run_id must be"),
        ("max_loss_ratio", 0, 2, {"max_loss_ratio": 0.5}, r"max_loss_ratio must be"),
    )
    def test_invalid_arguments(self, rank, world_size, kwargs, message):
        with self.assertRaisesRegex(ValueError, message):
            sd.SharedDirectory(self.dir, rank, world_size, **kwargs)

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

    def test_last_round_is_a_variable_that_checkpoints_carry(self):
        self.publish_as(1, self.peer, 3)
        source = self.directory()
        source.graft_round(grafting.Grafter(self.model), 3)
        state = source.track(self.model)
        self.assertEqual(int(state.last_round.numpy()), 3)
        self.assertLen(self.model.weights, len(self.peer.weights))  # not one of the model's weights
        path = os.path.join(self.get_temp_dir(), "rank0.weights.h5")
        self.model.save_weights(path)
        prefix = tf.train.Checkpoint(model=self.model).write(os.path.join(self.get_temp_dir(), "rank0_ckpt"))
        for restore in (lambda model: model.load_weights(path),
                        lambda model: tf.train.Checkpoint(model=model).read(prefix).assert_existing_objects_matched()):
            restarted = tiny.build_model(0)
            other = sd.SharedDirectory(self.dir, 0, 2)
            restarted_state = other.track(restarted)
            self.assertEqual(int(restarted_state.last_round.numpy()), -1)
            restore(restarted)
            self.assertEqual(int(restarted_state.last_round.numpy()), 3)
            with self.assertRaisesRegex(ValueError, "already grafted round 3"):
                other.graft_round(grafting.Grafter(restarted), 3)

    def test_unrestored_round_overwrites_its_own_file(self):
        self.publish_as(0, self.peer, 5)  # left by the process before the restart
        self.publish_as(1, self.peer, 5)
        original = self.model.get_weights()
        self.directory().graft_round(grafting.Grafter(self.model), 5)
        _, published = sd.SharedDirectory(self.dir, 1, 2).read_peer(0 + 5, rank=0)
        self.assertWeightsEqual(original, published)

    def test_setup_removes_only_its_own_temporary_files(self):
        tf.io.gfile.makedirs(self.dir)
        own = [f"{self.dir}/.round-000001-rank-0.weights.npz.tmp-abc", f"{self.dir}/.final-rank-0.state.npz.tmp-abc"]
        other = f"{self.dir}/.round-000001-rank-1.weights.npz.tmp-abc"
        for path in (*own, other):
            with open(path, "wb") as f:
                f.write(b"partial")
        self.directory()
        self.assertEqual([n for n in os.listdir(self.dir) if ".tmp-" in n], [os.path.basename(other)])

    def test_bfloat16_weights_are_stored_as_float32(self):
        def dense():
            return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="bfloat16")])

        model, peer = dense(), dense()
        sd.SharedDirectory(self.dir, 1, 2).publish(peer, 0)
        paths, arrays = sd.SharedDirectory(self.dir, 0, 2).read_peer(0, model=model)
        self.assertEqual(arrays[0].dtype, np.float32)
        self.assertAllEqual(arrays[0], peer.weights[0].numpy().astype(np.float32))
        grafting.Grafter(model).graft_arrays(arrays)
        self.assertEqual(model.weights[0].dtype, "bfloat16")


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class _ProcessesTestCase(tf.test.TestCase):
    """Real processes (tests/processes.py), each training with model.fit and grafting through a temporary
    directory."""

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
        process = processes.PythonProcess(
            WORKER, [f"--dir={self.dir}", f"--out={self.root}", f"--rank={rank}", *flags],
            stdout=f"{self.root}/rank{rank}-{len(self.processes)}.log", stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def finish(self, process, timeout=600):
        rc = process.wait(timeout=timeout)
        return rc, process.output()[0]

    def weights(self, rank, name="final"):
        with np.load(f"{self.root}/rank{rank}-{name}.npz", allow_pickle=False) as archive:
            return [archive[f"arr_{i}"] for i in range(len(archive.files))]

    def run_with_kills(self, world_size, epochs, kills):
        """Runs every rank, restarting a rank (the same command) each time it is killed; returns the restarts."""
        commands = [[f"--world_size={world_size}", f"--epochs={epochs}", "--timeout=400",
                     f"--kill={','.join(kills.get(k, []))}"] for k in range(world_size)]
        running = {k: self.start(k, *commands[k]) for k in range(world_size)}
        restarts = [0] * world_size
        deadline = time.monotonic() + 900
        while running:
            self.assertLess(time.monotonic(), deadline, "the ranks did not finish")
            time.sleep(0.5)
            for k, process in list(running.items()):
                rc = process.poll()
                if rc is None:
                    continue
                rc, log = self.finish(process)
                if rc == 3:
                    restarts[k] += 1
                    running[k] = self.start(k, *commands[k])
                else:
                    self.assertEqual(rc, 0, log)
                    del running[k]
        self.assertEqual(restarts, [len(kills.get(k, [])) for k in range(world_size)])
        return restarts

    def assertMatchesInProcessRing(self, world_size, epochs):
        expected = simulate_ring(world_size, epochs)
        for k in range(world_size):
            self.assertAllClose(expected[k], self.weights(k), rtol=1e-5, atol=1e-6)


class KillPointsTest(_ProcessesTestCase):
    """Process start-up dominates (importing TensorFlow), so one three-rank run, restarted after each of six kills,
    covers every kill point."""

    def test_every_kill_point_three_ranks(self):
        epochs = 4  # rounds 0, 1, 2 open epochs 1, 2, 3
        # All five kill points, and each rank dies at least once around the exchange with its neighbours.
        self.run_with_kills(3, epochs, {0: ["mid_epoch:1", "after_publish:2", "after_fit:0"],
                                        1: ["after_graft:0", "during_write:1"], 2: ["after_publish:1"]})
        self.assertMatchesInProcessRing(3, epochs)  # no round lost, none grafted twice, no weights lost
        self.assertEqual(sorted(os.listdir(self.dir)),
                         [*[f"final-rank-{k}.state.npz" for k in range(3)],
                          *[f"round-00000{r}-rank-{k}.weights.npz" for r in (1, 2) for k in range(3)], "run.json"])


class DeadPeerTest(_ProcessesTestCase):

    def test_killed_peer_stops_the_other_with_a_timeout(self):
        # Rank 1 (one device) grafts round 0 and dies after epoch 1; rank 0 (MirroredStrategy on two devices) starts
        # once rank 1's round-0 file exists, so its short timeout only runs against the dead peer.
        rank1 = self.start(1, "--exit_after_epoch=1", "--save_grafts")
        first_file = f"{self.dir}/round-000000-rank-1.weights.npz"
        deadline = time.monotonic() + 300
        while not os.path.exists(first_file) and time.monotonic() < deadline and rank1.poll() is None:
            time.sleep(0.1)
        rank0 = self.start(0, "--timeout=5", "--strategy=mirrored", "--save_grafts")
        rc, log = self.finish(rank1)
        self.assertEqual(rc, 4, log)
        died = time.monotonic()
        rc, log = self.finish(rank0)
        self.assertLess(time.monotonic() - died, 5 + 60)
        self.assertNotEqual(rc, 0)
        self.assertRegex(log, r"TimeoutError: SharedDirectory rank 0: timed out after 5 s waiting for the weights of "
                              r"rank 1 for round 1 at .*/shared/round-000001-rank-1\.weights\.npz")
        # Round 0 went through across the two strategies: both ranks ended it with equal weights.
        self.assertAllClose(self.weights(0, "graft0"), self.weights(1, "graft0"), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
