"""Grafting between processes or hosts that share only a directory (a local disk, NFS, or a bucket).

Every process trains one model with ``model.fit`` and has a rank ``k`` in ``0 .. world_size - 1``. At the end of
each graft round ``r`` (the 0-based epoch that the :class:`keras_graft.Grafting` callback passes), rank ``k``

1. publishes its weights, as they are before this round's graft, to ``round-{r:06d}-rank-{k}.weights.npz``;
2. waits for its ring predecessor's file of the same round, ``round-{r:06d}-rank-{(k - 1) % world_size}...``;
3. grafts those weights into its model (exactly the in-process ring: every rank mixes in the weights its
   predecessor had before the round, so with two ranks both end the round with equal weights);
4. deletes its own files of old rounds, keeping the newest ``keep``. Nobody deletes another rank's files.

Files go through ``tf.io.gfile``, so ``path`` may be local, ``gs://``, ``hdfs://`` or (with tensorflow-io)
``s3://``. A file is written under a temporary name in the same directory and then renamed, so that no reader
ever sees a partial file (rename is atomic on POSIX file systems; on object stores the renamed object appears
whole).

File format: a NumPy ``.npz`` archive holding ``paths`` (the weight paths, in ``model.weights`` order) and
``w0``, ``w1``, ... (the values). It is read with ``allow_pickle=False``, never unpickled. Zip archives carry a
CRC-32 per member and a directory at the end of the file, so a truncated or corrupted file fails to load; a
reader treats it as not ready yet and retries until the timeout, then reports it. Any process can inspect a
published file with ``np.load(f, allow_pickle=False)``. Weights of a dtype NumPy cannot store (bfloat16) are
written as float32; the graft casts them back.

Waiting polls with exponential backoff (``poll_interval`` doubling up to ``max_poll_interval``) and gives up
after ``timeout`` seconds with a :class:`TimeoutError` naming the rank, the round and the file.

How many rounds to keep: rank ``k`` can finish round ``r`` while its successor is still waiting for rank
``k``'s file of round ``r - world_size + 2`` (the ring lets each rank run at most one round ahead of its
predecessor), so ``keep`` must be at least ``world_size - 1``; the default is ``max(2, world_size - 1)``.

Resuming: restart a process with ``keras.callbacks.BackupAndRestore`` (``save_freq="epoch"``) listed AFTER the
``Grafting`` callback, so that each backup holds the grafted weights. The restarted process resumes at the
epoch after its last backup, re-publishes that round (overwriting its old file atomically) and finds its
predecessor's file of that round still kept, since a predecessor is at most ``world_size - 2`` rounds ahead of
the last round a process published. It never grafts a round twice. The peers wait for the restarted process
meanwhile: give ``timeout`` room for a restart.

Each rank may run under its own distribution strategy (one GPU, a MirroredStrategy over several): the callback
grafts in cross-replica context and each process writes only its own rank's files. Use a fresh directory for
every training run; files of an old run would be taken for the peers' weights.
"""

import io
import re
import time
import uuid
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import grafting
from keras_graft import peers

_FILE_PATTERN = re.compile(r"^round-(\d{6,})-rank-(\d+)\.weights\.npz$")


class UnreadableWeightsError(ValueError):
    """A weights file is truncated, corrupted, or not in the SharedDirectory format."""


def encode_weights(paths, arrays):
    """The bytes of a weights file: an uncompressed ``.npz`` of ``paths`` and ``w0 .. w{n-1}``."""
    values = {}
    for i, array in enumerate(arrays):
        array = np.asarray(array)
        values[f"w{i}"] = array.astype(np.float32) if array.dtype.kind == "V" else array
    buffer = io.BytesIO()
    np.savez(buffer, paths=np.asarray(list(paths), dtype=np.str_), **values)
    return buffer.getvalue()


def decode_weights(data):
    """(paths, arrays) from the bytes of a weights file; raises UnreadableWeightsError if they are not valid."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            paths = [str(p) for p in archive["paths"]]
            arrays = [archive[f"w{i}"] for i in range(len(paths))]
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as error:
        raise UnreadableWeightsError(f"{type(error).__name__}: {error}") from None
    return paths, arrays


def write_atomically(path, data):
    """Writes ``data`` to a temporary file next to ``path``, then renames it to ``path`` (replacing it)."""
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)


class SharedDirectory(peers.PeerSource):
    """Peers in other processes or on other hosts, met through a shared directory; a ring of ``world_size``.

    ``model.fit(..., callbacks=[Grafting(peers=SharedDirectory("/shared/run1", rank, world_size))])`` in every
    process, each with its own ``rank``. Rank ``k`` grafts the weights of rank ``(k - 1) % world_size``. See the
    module docstring for the protocol, the file format and resuming.

    Args:
      path: the shared directory (created if missing); anything ``tf.io.gfile`` reaches.
      rank: this process's rank, ``0 <= rank < world_size``.
      world_size: the number of processes grafting together, at least 2 (grafting needs a peer; train without the
        Grafting callback for a single model).
      timeout: seconds to wait for the predecessor's file of a round before raising TimeoutError.
      poll_interval: first wait between two looks for the file, in seconds; it doubles after every look...
      max_poll_interval: ... up to this.
      keep: own rounds kept in the directory; at least ``world_size - 1`` (see the module docstring); None means
        ``max(2, world_size - 1)``.
    """

    def __init__(self, path, rank, world_size, timeout=600.0, poll_interval=0.05, max_poll_interval=2.0, keep=None):
        path = checks.path("SharedDirectory", "path", path)
        checks.integer("SharedDirectory", "world_size", world_size)
        checks.integer("SharedDirectory", "rank", rank)
        for name, value in (("timeout", timeout), ("poll_interval", poll_interval),
                            ("max_poll_interval", max_poll_interval)):
            checks.number("SharedDirectory", name, value, minimum=0, open_minimum=True,
                          finite=name != "timeout")  # timeout=inf waits for ever
        checks.integer("SharedDirectory", "keep", keep, allow_none=True)
        if int(world_size) != world_size or world_size < 2:
            raise ValueError(f"SharedDirectory needs world_size >= 2 processes to graft together, got "
                             f"world_size={world_size!r}. Train a single model without the Grafting callback.")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got rank={rank!r}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}.")
        if not 0 < poll_interval <= max_poll_interval:
            raise ValueError(f"Need 0 < poll_interval <= max_poll_interval, got {poll_interval!r} and "
                             f"{max_poll_interval!r}.")
        world_size = int(world_size)
        if keep is None:
            keep = max(2, world_size - 1)
        if int(keep) != keep or keep < world_size - 1:
            raise ValueError(f"keep must be an integer >= world_size - 1 = {world_size - 1}, got keep={keep!r}: a "
                             "rank's successor can still need the files of its last world_size - 1 rounds.")
        self.path = str(path).rstrip("/")
        self.rank = int(rank)
        self.world_size = world_size
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.keep = int(keep)
        self._last_round = None

    @property
    def peer_rank(self):
        """The ring predecessor this rank grafts from."""
        return (self.rank - 1) % self.world_size

    def filename(self, round_index, rank=None):
        """The path of a rank's weights file of a round (this rank's by default)."""
        rank = self.rank if rank is None else rank
        return f"{self.path}/round-{round_index:06d}-rank-{rank}.weights.npz"

    def _own_files(self):
        """{round: filename} of this rank's published files."""
        rounds = {}
        for name in tf.io.gfile.listdir(self.path):
            match = _FILE_PATTERN.match(name)
            if match and int(match.group(2)) == self.rank:
                rounds[int(match.group(1))] = f"{self.path}/{name}"
        return rounds

    def setup(self, model):
        """Creates the directory and removes this rank's temporary files left by a process that died."""
        if not model.built or not model.weights:
            raise ValueError(f"Model '{model.name}' is not built; build it before grafting.")
        tf.io.gfile.makedirs(self.path)
        for name in tf.io.gfile.listdir(self.path):
            if name.startswith(".round-") and f"-rank-{self.rank}.weights.npz.tmp-" in name:
                tf.io.gfile.remove(f"{self.path}/{name}")

    def publish(self, model, round_index):
        """Writes ``model``'s current weights as this rank's file of ``round_index``; returns its path."""
        path = self.filename(round_index)
        tf.io.gfile.makedirs(self.path)
        write_atomically(path, encode_weights([w.path for w in model.weights], model.get_weights()))
        return path

    def read_peer(self, round_index, rank=None):
        """Waits for a rank's file of ``round_index`` (the predecessor's by default); returns (paths, arrays).

        Raises TimeoutError when the file is still missing or unreadable after ``timeout`` seconds.
        """
        rank = self.peer_rank if rank is None else rank
        path = self.filename(round_index, rank)
        start = time.monotonic()
        delay = self.poll_interval
        while True:
            try:
                with tf.io.gfile.GFile(path, "rb") as f:
                    return decode_weights(f.read())
            except tf.errors.NotFoundError:
                problem = "the file did not appear"
            except UnreadableWeightsError as error:
                problem = f"the file is truncated or corrupted ({error})"
            remaining = self.timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise TimeoutError(
                    f"SharedDirectory rank {self.rank}: timed out after {self.timeout:g} s waiting for the weights "
                    f"of rank {rank} for round {round_index} at {path}: {problem}. Is rank {rank} still running, "
                    f"with the same directory and world_size={self.world_size}?"
                )
            time.sleep(min(delay, remaining))
            delay = min(2.0 * delay, self.max_poll_interval)

    def _delete_old_rounds(self, round_index):
        """Deletes this rank's files of rounds up to ``round_index`` except the newest ``keep``."""
        rounds = self._own_files()
        done = sorted(r for r in rounds if r <= round_index)
        for old in done[: -self.keep]:
            try:
                tf.io.gfile.remove(rounds[old])
            except tf.errors.NotFoundError:
                pass

    def graft_round(self, grafter, round_index):
        """Publishes, waits for the predecessor's weights of ``round_index``, grafts them, deletes old rounds."""
        if self._last_round is not None and round_index <= self._last_round:
            raise ValueError(
                f"SharedDirectory rank {self.rank} already grafted round {self._last_round}; rounds must increase. "
                "To continue training, pass initial_epoch to model.fit (or use keras.callbacks.BackupAndRestore)."
            )
        model = grafter.model
        self.publish(model, round_index)
        paths, arrays = self.read_peer(round_index)
        label = f"SharedDirectory rank {self.peer_rank} ({self.filename(round_index, self.peer_rank)})"
        grafting.check_compatible(model, [(p, a.shape) for p, a in zip(paths, arrays)], label)
        result = grafter.graft_arrays(arrays, label)
        self._delete_old_rounds(round_index)
        self._last_round = round_index
        logging.debug("SharedDirectory rank %d grafted round %d from rank %d.", self.rank, round_index,
                      self.peer_rank)
        return [result]
