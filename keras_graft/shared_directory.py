"""Grafting between processes or hosts that share only a directory (a local disk, NFS, or a bucket).

Every process trains one model with ``model.fit`` and has a rank ``k`` in ``0 .. world_size - 1``. The round
``r`` (the 0-based epoch that the :class:`keras_graft.Grafting` callback passes: it runs when epoch ``r + 1``
begins) goes:

1. rank ``k`` publishes its weights, as they are before this round's graft, with its loss of epoch ``r``, to
   ``round-{r:06d}-rank-{k}.weights.npz``;
2. it waits for its ring predecessor's file of the same round, ``round-{r:06d}-rank-{(k - 1) % world_size}...``;
3. it grafts those weights into its model (exactly the in-process ring: every rank mixes in the weights its
   predecessor had before the round, so with two ranks both end the round with equal weights), unless the
   predecessor is unhealthy: its loss is not finite or exceeds ``max_loss_ratio`` times the better of the two
   losses (a warning says so, and the round keeps the rank's own weights);
4. it deletes its own files of old rounds, keeping the newest ``keep``. Nobody deletes another rank's files.

Files go through ``tf.io.gfile``, so ``path`` may be local, ``gs://``, ``hdfs://`` or (with tensorflow-io)
``s3://``. A file is written under a temporary name in the same directory and then renamed, so that no reader
ever sees a partial file (rename is atomic on POSIX file systems; on object stores the renamed object appears
whole).

The run: ``run.json`` names the run (``run_id``, ``world_size``); the first process creates it, the others (and
restarted processes) join it, and every file carries the run id. A process started with another ``run_id`` or
``world_size`` is refused at once, and so is a weights file of another run. With ``run_id=None`` the directory is
the run: a new run in a used directory is taken for a restart of the old one, so use a fresh directory per run or
pass a ``run_id`` (e.g. the job id) that changes between runs and not between restarts.

File format (``keras_graft.shared_directory/2``): an uncompressed NumPy ``.npz`` archive holding ``meta`` (a JSON
string: format, run id, rank, round, world size, the epoch's loss), ``paths`` (the weight paths, in
``model.weights`` order) and ``w0``, ``w1``, ... (the values); with ``resume=True`` also ``state_paths`` and
``s0``, ``s1``, ... (the optimizer's variables and the random seed generators' states) that only the rank itself
reads back. Weights of a dtype NumPy cannot store (bfloat16) are written as float32; the graft casts them back.
Any process can inspect a file with ``np.load(f, allow_pickle=False)``.

Reading is defensive: only regular files are opened (a FIFO, device or directory under a peer's file name is
refused at once, without blocking); the members' names, their number, and every array's shape and dtype (floating,
the model's own) are checked from the ``.npy`` headers inside the zip archive before any array is read, so a small
file cannot expand into a large allocation; arrays are never unpickled. A file that breaks these rules, or
belongs to another run, rank or round, raises :class:`InvalidWeightsError` at once, naming the file and the
defect. A damaged file (truncated, bad CRC, not a zip archive) is retried while it changes, in case it is being
replaced, and raises :class:`UnreadableWeightsError` once it has stayed the same for ``bad_file_grace`` seconds.
A file that never appears raises :class:`TimeoutError` after ``timeout`` seconds, naming the rank, the round and
the file. Waiting polls with exponential backoff (``poll_interval`` doubling up to ``max_poll_interval``).

How many rounds to keep: a rank's predecessor can finish round ``r + world_size - 2`` while the rank itself has
published only up to round ``r`` (each hop of the ring lets a rank run one round ahead), and a restarted rank needs
its predecessor's file of the rank's last published round; so ``keep`` must be at least ``world_size - 1``; the
default is ``max(2, world_size - 1)``.

Surviving a kill (``resume=True``, the default): the rank's own round files are its checkpoints. The file of round
``r`` holds everything the rank needs to continue exactly: the weights after epoch ``r`` (before the graft), the
optimizer's variables (iteration count, momentum, ...) and the seed generators' states (Dropout). A restarted
process (the same command) finds its newest intact file, loads it, starts ``fit`` at epoch ``r + 1`` and re-runs
round ``r`` without publishing it again: its peers may already have grafted that file. When ``fit`` returns the
rank writes ``final-rank-{k}.state.npz`` (the final weights and state); a restart then does nothing but load them
(with a warning), so a finished rank's weights are never lost. A kill during a write leaves a temporary file that
the restarted process deletes. Not covered: the state of other callbacks (``ReduceLROnPlateau``, ``EarlyStopping``)
and a data order that is not the same at every epoch (shuffle with a fixed seed per epoch for an exact resume).
Do not combine this with ``keras.callbacks.BackupAndRestore``; if another reason needs it, list it *before*
``Grafting`` so that the rank's own state wins.

One process per rank: the process that holds a rank renews ``rank-{k}.lease`` every ``lease_interval`` seconds
(a daemon thread). A process that starts while the lease of its rank is being renewed by another is refused
(:class:`RankConflictError`); a stale lease (its owner was killed) is taken over after about 2.5 intervals. Two
processes started at the same moment detect each other at the next renewal, and the one that lost the lease
raises at its next round.

Each rank may run under its own distribution strategy (one GPU, a MirroredStrategy over several): the callback
grafts in cross-replica context and each process writes only its own rank's files.
"""

import io
import json
import math
import os
import re
import socket
import stat
import threading
import time
import uuid
import weakref
import zipfile

import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import grafting
from keras_graft import peers

FORMAT = "keras_graft.shared_directory/2"
_ROUND_PATTERN = re.compile(r"^round-(\d{6,})-rank-(\d+)\.weights\.npz$")
_MEMBER_PATTERN = re.compile(r"^(meta|paths|state_paths|w\d+|s\d+)\.npy$")
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_MAX_META_CHARS = 1 << 16
_MAX_PATH_CHARS = 4096
_MAX_HEADER_BYTES = 1 << 16
_MAX_SMALL_FILE = 1 << 16


class UnreadableWeightsError(ValueError):
    """A weights file cannot be used; this base class means damaged (truncated, corrupted, not a zip archive)."""

    def __init__(self, path, defect):
        super().__init__(f"{path}: {defect}")
        self.path = path
        self.defect = defect


class InvalidWeightsError(UnreadableWeightsError):
    """A weights file that is whole but unusable: not a regular file, wrong members, shapes or dtypes, another run."""


class RankConflictError(RuntimeError):
    """Two processes claim the same rank of a SharedDirectory run."""


# Writing.


def _storage(array):
    """The array as written: dtypes NumPy cannot store (bfloat16, kind 'V') become float32."""
    array = np.asarray(array)
    return array.astype(np.float32) if array.dtype.kind == "V" else array


def _storage_dtype(dtype):
    """The NumPy dtype a variable of ``dtype`` (a Keras dtype string) is written with."""
    dtype = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
    return np.dtype(np.float32) if dtype.kind == "V" else dtype


def encode_weights(paths, arrays, meta=None, state_paths=(), state_arrays=()):
    """The bytes of a weights file: an uncompressed ``.npz`` of ``meta``, ``paths``, ``w0 ..`` (and ``s0 ..``)."""
    meta = {"format": FORMAT, **(meta or {})}
    values = {"meta": np.asarray(json.dumps(meta)), "paths": np.asarray(list(paths), dtype=np.str_)}
    for i, array in enumerate(arrays):
        values[f"w{i}"] = _storage(array)
    state_paths = list(state_paths)
    if state_paths:
        values["state_paths"] = np.asarray(state_paths, dtype=np.str_)
        for i, array in enumerate(state_arrays):
            values[f"s{i}"] = _storage(array)
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    return buffer.getvalue()


def _is_local(path):
    return "://" not in path


def write_atomically(path, data):
    """Writes ``data`` to a temporary file next to ``path``, then renames it to ``path`` (replacing it)."""
    directory, name = path.rsplit("/", 1)
    temporary = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)


# Reading.


def _file_kind(mode):
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path, max_size=None):
    """(binary file object, signature) of a regular file; FileNotFoundError when missing.

    Local files are stat'ed before they are opened, and opened without blocking (a FIFO swapped in between is
    caught by fstat): only regular files are read. ``signature`` changes when the file is replaced or rewritten.
    """
    if _is_local(path):
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidWeightsError(path, f"{_file_kind(info.st_mode)}, not a regular file; only regular files are "
                                            "read")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidWeightsError(path, f"{_file_kind(info.st_mode)}, not a regular file; only regular files "
                                                "are read")
            _check_size(path, info.st_size, max_size)
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return handle, (info.st_size, info.st_mtime_ns, info.st_ino)
    try:
        info = tf.io.gfile.stat(path)
    except tf.errors.NotFoundError:
        raise FileNotFoundError(path) from None
    if info.is_directory:
        raise InvalidWeightsError(path, "a directory, not a regular file; only regular files are read")
    _check_size(path, info.length, max_size)
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    return io.BytesIO(data), (info.length, info.mtime_nsec)


def _check_size(path, size, max_size):
    if max_size is not None and size > max_size:
        raise InvalidWeightsError(path, f"{size} bytes, more than the {max_size} a file of this model can need")


def _signature(path):
    """What identifies a file's current content cheaply (None when missing)."""
    try:
        if _is_local(path):
            info = os.stat(path)
            return (info.st_size, info.st_mtime_ns, info.st_ino)
        info = tf.io.gfile.stat(path)
        return (info.length, info.mtime_nsec)
    except (OSError, tf.errors.OpError):
        return None


class WeightsFile:
    """A validated weights file: ``meta`` (dict), ``paths``, ``arrays``; ``state_paths``, ``state`` if read."""

    def __init__(self, meta, paths, arrays, state_paths=None, state=None):
        self.meta = meta
        self.paths = paths
        self.arrays = arrays
        self.state_paths = state_paths
        self.state = state


class _Reader:
    """Reads one weights archive: validates every header it needs before reading any array."""

    def __init__(self, archive, path):
        self.archive = archive
        self.path = path
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise InvalidWeightsError(path, "the archive holds two members of the same name")
        for name in names:
            if not _MEMBER_PATTERN.match(name):
                raise InvalidWeightsError(path, f"unexpected member '{name}' (a SharedDirectory weights file holds "
                                                "meta, paths, w0, w1, ... and optionally state_paths, s0, s1, ...)")
        self.infos = {name[: -len(".npy")]: info for name, info in zip(names, infos)}
        for info in infos:
            if info.flag_bits & 0x1:
                raise InvalidWeightsError(path, f"member '{info.filename}' is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise InvalidWeightsError(path, f"member '{info.filename}' uses an unsupported compression")

    def indexed(self, prefix):
        """How many members ``{prefix}0 ..`` there are; raises unless they are numbered 0 .. n-1 without a gap."""
        numbers = sorted(int(name[len(prefix):]) for name in self.infos
                         if name.startswith(prefix) and name[len(prefix):].isdigit())
        if numbers != list(range(len(numbers))) or any(f"{prefix}{i}" not in self.infos for i in numbers):
            raise InvalidWeightsError(self.path, f"the arrays {prefix}0, {prefix}1, ... are not numbered "
                                                 f"consecutively (found {[f'{prefix}{n}' for n in numbers]})")
        return len(numbers)

    def header(self, name):
        """(shape, fortran_order, dtype, data offset) of member ``name``, from its .npy header only."""
        if name not in self.infos:
            raise InvalidWeightsError(self.path, f"no member '{name}': not a SharedDirectory weights file ({FORMAT}); "
                                                 "files of another keras_graft version are not read")
        try:
            with self.archive.open(self.infos[name]) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER_BYTES)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER_BYTES)
                else:
                    raise InvalidWeightsError(self.path, f"member '{name}' has .npy format version {version}, "
                                                         "not 1.0 or 2.0")
                offset = f.tell()
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as error:
            if isinstance(error, InvalidWeightsError):
                raise
            raise UnreadableWeightsError(self.path, f"the header of member '{name}' is damaged ({error})") from None
        if dtype.hasobject:
            raise InvalidWeightsError(self.path, f"member '{name}' holds Python objects (dtype {dtype}); pickles are "
                                                 "never loaded")
        return tuple(shape), fortran, dtype, offset

    def read(self, name, header):
        """The array of member ``name`` whose validated ``header`` is given; checks its size and CRC."""
        shape, fortran, dtype, offset = header
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        info = self.infos[name]
        if info.file_size != offset + nbytes:
            raise InvalidWeightsError(self.path, f"member '{name}' holds {info.file_size - offset} bytes of data but "
                                                 f"its header announces {nbytes} (shape {shape}, {dtype})")
        try:
            with self.archive.open(info) as f:
                f.read(offset)
                raw = f.read(nbytes)
                f.read(1)  # reaching the end checks the member's CRC-32
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            raise UnreadableWeightsError(self.path, f"member '{name}' is damaged ({error})") from None
        if len(raw) != nbytes:
            raise UnreadableWeightsError(self.path, f"member '{name}' is truncated")
        array = np.frombuffer(raw, dtype=dtype)
        return array.reshape(shape, order="F" if fortran else "C")

    def strings(self, name, ndim, max_chars):
        """A string array member (``meta`` or the paths), validated from its header first."""
        header = self.header(name)
        shape, _, dtype, _ = header
        if dtype.kind != "U" or len(shape) != ndim or dtype.itemsize > 4 * max_chars:
            raise InvalidWeightsError(self.path, f"member '{name}' must be a {ndim}-d array of strings of at most "
                                                 f"{max_chars} characters, got shape {shape} and dtype {dtype}")
        return self.read(name, header)


def _weights_label(path):
    return f"weights file {path}"


def read_weights_file(path, expected=None, state=None, source=None, max_size=None, label=None):
    """Reads and validates a weights file; returns a :class:`WeightsFile`.

    Args:
      path: the file; or a (file object, path) pair.
      expected: the model whose weights the file must fit (names in messages, shapes and dtypes), or None: any
        floating arrays.
      state: None (the state members are not read), or the variables the state members must fit.
      source: a file object to read instead of opening ``path`` (``path`` then only names it in messages).
      max_size: refuse larger files at once.
      label: how messages name the file's writer (e.g. "SharedDirectory rank 1 (path)").
    """
    handle = source
    if handle is None:
        handle, _ = _open_regular(path, max_size)
    try:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            raise UnreadableWeightsError(path, f"not a readable zip archive, truncated or corrupted "
                                               f"({type(error).__name__}: {error})") from None
        with archive:
            reader = _Reader(archive, path)
            meta = _parse_meta(reader.strings("meta", 0, _MAX_META_CHARS), path)
            paths = [str(p) for p in reader.strings("paths", 1, _MAX_PATH_CHARS)]
            count = reader.indexed("w")
            if count != len(paths):
                raise InvalidWeightsError(path, f"'paths' names {len(paths)} weights but the file holds {count} "
                                                "arrays w0, w1, ...")
            headers = [reader.header(f"w{i}") for i in range(count)]
            if expected is not None:
                try:
                    grafting.check_compatible(expected, [(p, h[0]) for p, h in zip(paths, headers)],
                                              label or _weights_label(path))
                except ValueError as error:
                    raise InvalidWeightsError(path, str(error)) from None
                dtypes = [_storage_dtype(w.dtype) for w in expected.weights]
            else:
                dtypes = [None] * count
            for i, ((shape, _, dtype, _), want) in enumerate(zip(headers, dtypes)):
                if want is None and dtype.kind != "f":
                    raise InvalidWeightsError(path, f"array w{i} ('{paths[i]}') has dtype {dtype}; weights must be "
                                                    "floating point")
                if want is not None and dtype != want:
                    raise InvalidWeightsError(path, f"array w{i} ('{paths[i]}') has dtype {dtype}, the model's weight "
                                                    f"is stored as {want}" +
                                              ("; weights must be floating point" if dtype.kind != "f" else ""))
            result = WeightsFile(meta, paths, [reader.read(f"w{i}", h) for i, h in enumerate(headers)])
            if state is not None:
                result.state_paths, result.state = _read_state(reader, path, state)
            return result
    finally:
        if source is None:
            handle.close()


def _read_state(reader, path, variables):
    """(paths, arrays) of the state members, which must fit ``variables`` (shapes and dtypes)."""
    count = reader.indexed("s")
    if "state_paths" not in reader.infos:
        if variables or count:
            raise InvalidWeightsError(path, "the file holds no training state (state_paths, s0, ...): it was written "
                                            "with resume=False or by a process without an optimizer")
        return [], []
    names = [str(p) for p in reader.strings("state_paths", 1, _MAX_PATH_CHARS)]
    if count != len(names):
        raise InvalidWeightsError(path, f"'state_paths' names {len(names)} variables but the file holds {count} arrays "
                                        "s0, s1, ...")
    if count != len(variables):
        raise InvalidWeightsError(path, f"the training state holds {count} variables ({names[:4]}...), this process "
                                        f"has {len(variables)} ({[v.path for v in variables][:4]}...): another "
                                        "optimizer or model configuration wrote it")
    headers = [reader.header(f"s{i}") for i in range(count)]
    for i, (variable, (shape, _, dtype, _)) in enumerate(zip(variables, headers)):
        want = _storage_dtype(variable.dtype)
        if tuple(shape) != tuple(variable.shape) or dtype != want:
            raise InvalidWeightsError(path, f"training state variable '{names[i]}' has shape {shape} and dtype {dtype} "
                                            f"in the file but '{variable.path}' has shape {tuple(variable.shape)} and "
                                            f"dtype {want} here: another optimizer or model configuration wrote it")
    return names, [reader.read(f"s{i}", h) for i, h in enumerate(headers)]


def _parse_meta(value, path):
    try:
        meta = json.loads(str(value[()]))
    except (ValueError, TypeError) as error:
        raise InvalidWeightsError(path, f"member 'meta' is not JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise InvalidWeightsError(path, f"member 'meta' does not describe a {FORMAT} file (format {found!r})")
    return meta


def decode_weights(data):
    """(paths, arrays) from the bytes of a weights file; raises UnreadableWeightsError if they are not valid."""
    result = read_weights_file("<bytes>", source=io.BytesIO(data))
    return result.paths, result.arrays


def _assign(variable, array):
    variable.assign(tf.cast(array, variable.dtype))


def _seed_states(model):
    """The states of ``model``'s random seed generators (Dropout, ...): variables that are not weights."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def training_state(model, fit_model=None):
    """What a rank's checkpoint holds besides ``model.weights``: the optimizer's variables, the seed states.

    ``fit_model``: the model ``fit`` trains when it is not ``model`` (e.g. a Distiller whose student grafts); its
    weights are part of the state then.
    """
    fit_model = model if fit_model is None else fit_model
    variables = [] if fit_model is model else list(fit_model.weights)
    optimizer = getattr(fit_model, "optimizer", None)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(fit_model.trainable_variables)
        variables += list(optimizer.variables)
    return variables + _seed_states(fit_model)


# Claims.


def _renew_lease_loop(reference, stop, interval):
    """The heartbeat of a rank's lease; ends when told, when the SharedDirectory is gone, or when it lost the lease."""
    while not stop.wait(interval):
        source = reference()
        if source is None:
            return
        try:
            keep_going = source._renew_lease()
        except (OSError, tf.errors.OpError, ValueError) as error:
            logging.warning("SharedDirectory rank %d: could not renew %s: %s", source.rank, source.lease_filename(),
                            error)
            keep_going = True
        del source
        if not keep_going:
            return


class ResumePoint:
    """Where a restored rank continues: ``fit`` starts at ``start_epoch``; ``last_epoch`` is the last trained epoch
    and ``round_done`` whether the round after it already ran."""

    def __init__(self, start_epoch, last_epoch, round_done):
        self.start_epoch = start_epoch
        self.last_epoch = last_epoch
        self.round_done = round_done


class SharedDirectory(peers.PeerSource):
    """Peers in other processes or on other hosts, met through a shared directory; a ring of ``world_size``.

    ``model.fit(..., callbacks=[Grafting(peers=SharedDirectory("/shared/run1", rank, world_size))])`` in every
    process, each with its own ``rank``. Rank ``k`` grafts the weights of rank ``(k - 1) % world_size``. See the
    module docstring for the protocol, the file format, the checks on files and resuming.

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
      run_id: names the run (letters, digits, ``._-``); processes and files of another run are refused. None: the
        id in the directory's ``run.json``, or a new random one for the first process.
      max_loss_ratio: a peer whose epoch loss exceeds this multiple of the better loss of the two (when that is
        positive), or is not finite, is not grafted in that round. None: only non-finite losses count. Default 10.
      resume: keep each rank's training state in its round files, restart where a killed process stopped and
        make a restart after ``fit`` returned a no-op (see the module docstring).
      bad_file_grace: seconds a damaged file may stay unchanged before it is reported (it may be being replaced).
      lease_interval: seconds between renewals of the rank's lease (two processes with one rank are detected);
        None: no lease.
    """

    STATE_ATTRIBUTE = "_keras_graft_shared_directory_state"

    def __init__(self, path, rank, world_size, timeout=600.0, poll_interval=0.05, max_poll_interval=2.0, keep=None,
                 run_id=None, max_loss_ratio=10.0, resume=True, bad_file_grace=5.0, lease_interval=2.0):
        path = checks.path("SharedDirectory", "path", path)
        checks.integer("SharedDirectory", "world_size", world_size)
        checks.integer("SharedDirectory", "rank", rank)
        for name, value in (("timeout", timeout), ("poll_interval", poll_interval),
                            ("max_poll_interval", max_poll_interval)):
            checks.number("SharedDirectory", name, value, minimum=0, open_minimum=True,
                          finite=name != "timeout")  # timeout=inf waits for ever
        checks.integer("SharedDirectory", "keep", keep, allow_none=True)
        if isinstance(world_size, bool) or int(world_size) != world_size or world_size < 2:
            raise ValueError(f"SharedDirectory needs world_size >= 2 processes to graft together, got "
                             f"world_size={world_size!r}. Train a single model without the Grafting callback.")
        if isinstance(rank, bool) or int(rank) != rank or not 0 <= rank < world_size:
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
        if run_id is not None and not (isinstance(run_id, str) and _RUN_ID_PATTERN.match(run_id)):
            raise ValueError(f"run_id must be 1 to 128 letters, digits, '.', '_' or '-', got {run_id!r}.")
        if max_loss_ratio is not None and not (max_loss_ratio >= 1 and math.isfinite(max_loss_ratio)):
            raise ValueError(f"max_loss_ratio must be a finite number >= 1 or None, got {max_loss_ratio!r}.")
        if not (bad_file_grace >= 0 and math.isfinite(bad_file_grace)):
            raise ValueError(f"bad_file_grace must be a finite number of seconds >= 0, got {bad_file_grace!r}.")
        if lease_interval is not None and not (lease_interval > 0 and math.isfinite(lease_interval)):
            raise ValueError(f"lease_interval must be > 0 seconds or None, got {lease_interval!r}.")
        self.path = str(path).rstrip("/")
        self.rank = int(rank)
        self.world_size = world_size
        self.timeout = float(timeout)
        self.poll_interval = float(poll_interval)
        self.max_poll_interval = float(max_poll_interval)
        self.keep = int(keep)
        self.run_id = run_id
        self.max_loss_ratio = None if max_loss_ratio is None else float(max_loss_ratio)
        self.resume = bool(resume)
        self.bad_file_grace = float(bad_file_grace)
        self.lease_interval = None if lease_interval is None else float(lease_interval)
        self._run = None
        self._token = uuid.uuid4().hex
        self._states = {}
        self._losses = {}
        self._resumed = None  # (round, its loss): the round to re-run without publishing it again
        self._completed = False
        self._restored = None
        self._model = None
        self._fit_model = None
        self._epochs = None
        self._lease_stop = None
        self._conflict = None
        self._beat = 0
        self._lease_lock = threading.Lock()

    # Names.

    @property
    def peer_rank(self):
        """The ring predecessor this rank grafts from."""
        return (self.rank - 1) % self.world_size

    def filename(self, round_index, rank=None):
        """The path of a rank's weights file of a round (this rank's by default)."""
        rank = self.rank if rank is None else rank
        return f"{self.path}/round-{round_index:06d}-rank-{rank}.weights.npz"

    def final_filename(self, rank=None):
        """The file a rank leaves when its ``fit`` returned: final weights and state (the completion marker)."""
        rank = self.rank if rank is None else rank
        return f"{self.path}/final-rank-{rank}.state.npz"

    def lease_filename(self, rank=None):
        rank = self.rank if rank is None else rank
        return f"{self.path}/rank-{rank}.lease"

    def run_filename(self):
        return f"{self.path}/run.json"

    def _own_files(self):
        """{round: filename} of this rank's published files."""
        rounds = {}
        for name in tf.io.gfile.listdir(self.path):
            match = _ROUND_PATTERN.match(name)
            if match and int(match.group(2)) == self.rank:
                rounds[int(match.group(1))] = f"{self.path}/{name}"
        return rounds

    # Set-up: the run and the rank's claim.

    def setup(self, model):
        """Joins the run, claims the rank, and removes this rank's temporary files left by a process that died."""
        if not model.built or not model.weights:
            raise ValueError(f"Model '{model.name}' is not built; build it before grafting.")
        tf.io.gfile.makedirs(self.path)
        own_temporary = re.compile(rf"^\.(round-\d+-rank-{self.rank}\.weights\.npz|final-rank-{self.rank}\.state\.npz|"
                                   rf"rank-{self.rank}\.lease)\.tmp-")
        for name in tf.io.gfile.listdir(self.path):
            if own_temporary.match(name):
                tf.io.gfile.remove(f"{self.path}/{name}")
        self._join_run()
        self._claim()

    def _read_small_json(self, path):
        """A small JSON object file (run.json, a lease); None when missing."""
        try:
            handle, _ = _open_regular(path, _MAX_SMALL_FILE)
        except FileNotFoundError:
            return None
        with handle:
            text = handle.read()
        try:
            value = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidWeightsError(path, f"not a JSON file ({error})") from None
        if not isinstance(value, dict):
            raise InvalidWeightsError(path, "not a JSON object")
        return value

    def _join_run(self):
        """Reads (or creates) run.json; refuses another run or another world size."""
        if self._run is not None:
            return
        path = self.run_filename()
        tf.io.gfile.makedirs(self.path)
        for _ in range(3):
            info = self._read_small_json(path)
            if info is None:
                info = {"format": FORMAT, "run_id": self.run_id or uuid.uuid4().hex, "world_size": self.world_size,
                        "created_by": self._owner_description()}
                if self._create_exclusively(path, json.dumps(info).encode()):
                    break
                continue
            break
        else:
            raise RuntimeError(f"Could not create or read {path}.")
        if not isinstance(info.get("run_id"), str) or not isinstance(info.get("world_size"), int):
            raise InvalidWeightsError(path, "run.json lacks run_id or world_size")
        if self.run_id is not None and info["run_id"] != self.run_id:
            raise ValueError(f"SharedDirectory rank {self.rank}: {self.path} holds run '{info['run_id']}' ({path}), "
                             f"this process belongs to run '{self.run_id}'. Use a fresh directory for a new run, or "
                             "the same run_id to resume that run.")
        if info["world_size"] != self.world_size:
            raise ValueError(f"SharedDirectory rank {self.rank}: run '{info['run_id']}' in {self.path} has "
                             f"world_size={info['world_size']} ({path}), this process world_size={self.world_size}.")
        self._run = info["run_id"]

    def _create_exclusively(self, path, data):
        """Creates ``path`` with ``data`` unless it exists; returns whether this call created it."""
        directory, name = path.rsplit("/", 1)
        temporary = f"{directory}/.{name}.tmp-{uuid.uuid4().hex}"
        with tf.io.gfile.GFile(temporary, "wb") as f:
            f.write(data)
        try:
            if _is_local(path):
                os.link(temporary, path)  # atomic, fails if the name exists
            else:
                tf.io.gfile.rename(temporary, path, overwrite=False)
            return True
        except (FileExistsError, tf.errors.AlreadyExistsError):
            return False
        finally:
            if tf.io.gfile.exists(temporary):
                tf.io.gfile.remove(temporary)

    def _owner_description(self):
        return {"host": socket.gethostname(), "pid": os.getpid()}

    def _lease_record(self):
        return {"token": self._token, "beat": self._beat, "interval": self.lease_interval,
                **self._owner_description()}

    def _read_lease(self):
        try:
            return self._read_small_json(self.lease_filename())
        except InvalidWeightsError:
            return None  # a garbled lease (killed while writing? writes are atomic) counts as none

    def _claim(self):
        """Takes this rank's lease; raises RankConflictError while another live process renews it."""
        if self.lease_interval is None or self._lease_stop is not None:
            return
        lease = self._read_lease()
        if lease is not None and lease.get("token") != self._token:
            interval = lease.get("interval")
            interval = min(float(interval), 60.0) if isinstance(interval, (int, float)) and interval > 0 else 2.0
            deadline = time.monotonic() + 2.5 * interval
            while time.monotonic() < deadline:
                time.sleep(min(interval / 2, max(0.0, deadline - time.monotonic())))
                current = self._read_lease()
                if current is not None and current != lease:
                    raise RankConflictError(
                        f"SharedDirectory rank {self.rank} of {self.path} is held by another running process "
                        f"(host {current.get('host')}, pid {current.get('pid')}): two processes cannot have the same "
                        f"rank. Stop the other process, or give this one another rank ({self.lease_filename()}).")
            logging.info("SharedDirectory rank %d: taking over the stale lease of host %s pid %s.", self.rank,
                         lease.get("host"), lease.get("pid"))
        write_atomically(self.lease_filename(), json.dumps(self._lease_record()).encode())
        self._lease_stop = threading.Event()
        thread = threading.Thread(target=_renew_lease_loop,
                                  args=(weakref.ref(self), self._lease_stop, self.lease_interval),
                                  name=f"SharedDirectory-rank-{self.rank}-lease", daemon=True)
        thread.start()

    def _renew_lease(self):
        """One heartbeat; returns False (and records the conflict) when another process took the lease."""
        with self._lease_lock:
            return self._renew_lease_locked()

    def _renew_lease_locked(self):
        if self._lease_stop is None or self._lease_stop.is_set():
            return False
        lease = self._read_lease()
        if lease is not None and lease.get("token") != self._token:
            self._conflict = (f"SharedDirectory rank {self.rank} of {self.path} was claimed by another process (host "
                              f"{lease.get('host')}, pid {lease.get('pid')}) while this one (pid {os.getpid()}) held "
                              "it: two processes have the same rank. This process stops; check how the ranks were "
                              "assigned.")
            return False
        self._beat += 1
        write_atomically(self.lease_filename(), json.dumps(self._lease_record()).encode())
        return True

    def _check_claim(self):
        if self._conflict is not None:
            raise RankConflictError(self._conflict)

    def close(self):
        """Stops renewing the lease and releases it (idempotent)."""
        with self._lease_lock:
            if self._lease_stop is None:
                return
            self._lease_stop.set()
            self._lease_stop = None
            self._release_lease()

    def _release_lease(self):
        lease = self._read_lease()
        if lease is not None and lease.get("token") == self._token:
            try:
                tf.io.gfile.remove(self.lease_filename())
            except tf.errors.NotFoundError:
                pass

    # Writing.

    def _meta(self, kind, **fields):
        return {"run_id": self._run, "rank": self.rank, "world_size": self.world_size, "kind": kind,
                "writer": self._token, **fields}

    def _encode(self, model, meta):
        state_paths, state_arrays = (), ()
        if self.resume and self._fit_model is not None and model is self._model:
            variables = training_state(model, self._fit_model)
            state_paths = [v.path for v in variables]
            state_arrays = [np.asarray(v.numpy()) for v in variables]
        return encode_weights([w.path for w in model.weights], model.get_weights(), meta, state_paths, state_arrays)

    def publish(self, model, round_index):
        """Writes ``model``'s current weights (and loss) as this rank's file of ``round_index``; returns its path."""
        self._check_claim()
        self._join_run()
        path = self.filename(round_index)
        tf.io.gfile.makedirs(self.path)
        loss = self._losses.get(round_index)
        meta = self._meta("round", round=int(round_index), epoch=int(round_index), loss=loss)
        write_atomically(path, self._encode(model, meta))
        return path

    # Reading.

    def _max_size(self, model):
        if model is None:
            return None
        weight_bytes = sum(int(np.prod(w.shape)) * _storage_dtype(w.dtype).itemsize for w in model.weights)
        return 8 * weight_bytes + (1 << 20)

    def _check_meta(self, result, path, kind, rank, round_index=None):
        meta = result.meta
        if meta.get("run_id") != self._run:
            raise InvalidWeightsError(path, f"written by run '{meta.get('run_id')}', but this is run '{self._run}' "
                                            f"({self.run_filename()}): a file left by another run. Use a fresh "
                                            "directory for every run.")
        expected = {"rank": rank, "world_size": self.world_size, "kind": kind}
        if round_index is not None:
            expected["round"] = round_index
        for key, value in expected.items():
            if meta.get(key) != value:
                raise InvalidWeightsError(path, f"its meta says {key}={meta.get(key)!r}, the file name {key}={value!r}")
        loss = meta.get("loss")
        if loss is not None and not isinstance(loss, (int, float)):
            raise InvalidWeightsError(path, f"its meta holds loss={loss!r}, not a number")

    def _read_round(self, round_index, rank, model):
        path = self.filename(round_index, rank)
        label = f"SharedDirectory rank {rank} ({path})"
        result = read_weights_file(path, expected=model, max_size=self._max_size(model), label=label)
        self._check_meta(result, path, "round", rank, round_index)
        return result

    def _wait_for(self, round_index, rank, model=None):
        """Waits for a rank's file of ``round_index``; returns the validated WeightsFile."""
        self._join_run()
        path = self.filename(round_index, rank)
        start = time.monotonic()
        delay = self.poll_interval
        damaged_since, damaged_signature = None, None
        while True:
            self._check_claim()
            try:
                return self._read_round(round_index, rank, model)
            except FileNotFoundError:
                problem = "the file did not appear"
                damaged_since = None
            except InvalidWeightsError as error:
                raise InvalidWeightsError(
                    path, f"{error.defect} (SharedDirectory rank {self.rank}, weights of rank {rank} for round "
                          f"{round_index})") from None
            except UnreadableWeightsError as error:
                problem = f"the file is truncated or corrupted ({error.defect})"
                signature = _signature(path)
                if damaged_since is None or signature != damaged_signature:
                    damaged_since, damaged_signature = time.monotonic(), signature
                elif time.monotonic() - damaged_since >= self.bad_file_grace:
                    raise UnreadableWeightsError(
                        path, f"{error.defect}; unchanged for {self.bad_file_grace:g} s, so not being replaced "
                              f"(SharedDirectory rank {self.rank}, weights of rank {rank} for round {round_index})"
                    ) from None
            remaining = self.timeout - (time.monotonic() - start)
            if remaining <= 0:
                raise TimeoutError(
                    f"SharedDirectory rank {self.rank}: timed out after {self.timeout:g} s waiting for the weights "
                    f"of rank {rank} for round {round_index} at {path}: {problem}. Is rank {rank} still running, "
                    f"with the same directory and world_size={self.world_size}?"
                )
            time.sleep(min(delay, remaining))
            delay = min(2.0 * delay, self.max_poll_interval)

    def read_peer(self, round_index, rank=None, model=None):
        """Waits for a rank's file of ``round_index`` (the predecessor's by default); returns (paths, arrays).

        ``model``: validate shapes and dtypes against it. Raises TimeoutError when the file is still missing after
        ``timeout`` seconds, InvalidWeightsError at once for a file that breaks the format or belongs to another
        run, and UnreadableWeightsError for a damaged file that stays unchanged for ``bad_file_grace`` seconds.
        """
        result = self._wait_for(round_index, self.peer_rank if rank is None else rank, model)
        return result.paths, result.arrays

    # Rounds.

    def _peer_health(self, own_loss, peer_loss):
        """None when the peer may be grafted in, else the reason it may not."""
        if peer_loss is None:
            return None
        if not math.isfinite(peer_loss):
            return f"its loss is {peer_loss}"
        if self.max_loss_ratio is not None and own_loss is not None and math.isfinite(own_loss):
            best = min(own_loss, peer_loss)
            if best > 0 and peer_loss > self.max_loss_ratio * best:
                return (f"its loss {peer_loss:.6g} exceeds {self.max_loss_ratio:g} x the better loss {best:.6g} "
                        "(max_loss_ratio)")
        return None

    def _delete_old_rounds(self, round_index):
        """Deletes this rank's files of rounds up to ``round_index`` except the newest ``keep``."""
        rounds = self._own_files()
        done = sorted(r for r in rounds if r <= round_index)
        for old in done[: -self.keep]:
            try:
                tf.io.gfile.remove(rounds[old])
            except tf.errors.NotFoundError:
                pass

    def track(self, model):
        """The model's state: ``last_round``, the last round grafted (-1: none), a variable that ``save_weights``
        and ``BackupAndRestore`` carry. Attached on the first call for ``model``, then reused."""
        entry = self._states.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, peers.attach_state(model, self.STATE_ATTRIBUTE, {"last_round": -1}))
            self._states[id(model)] = entry
        return entry[1]

    def graft_round(self, grafter, round_index):
        """Publishes, waits for the predecessor's weights of ``round_index``, grafts them, deletes old rounds."""
        state = self.track(grafter.model)
        last_round = int(state.last_round.numpy())
        if last_round >= 0 and round_index <= last_round:
            raise ValueError(
                f"SharedDirectory rank {self.rank} already grafted round {last_round}; rounds must increase. "
                "To continue training, pass initial_epoch to model.fit (a restarted process resumes by itself)."
            )
        self._check_claim()
        model = grafter.model
        if self._resumed is not None and self._resumed[0] == round_index:
            own_loss = self._resumed[1]  # restarted: the file is already published, peers may have read it
        else:
            own_loss = self._losses.get(round_index)
            self.publish(model, round_index)
        self._resumed = None
        peer = self._wait_for(round_index, self.peer_rank, model)
        label = f"SharedDirectory rank {self.peer_rank} ({self.filename(round_index, self.peer_rank)})"
        problem = self._peer_health(own_loss, peer.meta.get("loss"))
        if problem is not None:
            logging.warning("SharedDirectory rank %d, round %d: rank %d is unhealthy (%s); it is not grafted in "
                            "this round.", self.rank, round_index, self.peer_rank, problem)
        result = grafter.graft_arrays(peer.arrays, label, peer_usable=problem is None)
        self._delete_old_rounds(round_index)
        state.last_round.assign(round_index)
        logging.debug("SharedDirectory rank %d grafted round %d from rank %d.", self.rank, round_index,
                      self.peer_rank)
        return [result]

    # Resuming.

    def record_epoch(self, epoch, logs):
        """Keeps the epoch's loss, published with the weights of the round that follows it."""
        loss = (logs or {}).get("loss")
        if loss is not None:
            self._losses = {epoch: float(loss)}

    def _load(self, path, kind, model, fit_model):
        """The validated state file at ``path``; None (with a warning) when it is damaged."""
        try:
            result = read_weights_file(path, expected=model, state=training_state(model, fit_model))
            self._check_meta(result, path, kind, self.rank)
            return result
        except FileNotFoundError:
            return None
        except InvalidWeightsError as error:
            raise InvalidWeightsError(path, f"{error.defect} (SharedDirectory rank {self.rank} cannot resume from "
                                            "it: use a fresh directory for another configuration)") from None
        except UnreadableWeightsError as error:
            logging.warning("SharedDirectory rank %d: cannot resume from %s (%s); trying an older file.", self.rank,
                            path, error.defect)
            return None

    def restore(self, model, fit_model, epochs):
        """Loads this rank's newest intact state (a round file or the final file); returns a ResumePoint or None.

        ``model`` grafts, ``fit_model`` is the model ``fit`` trains (usually the same), ``epochs`` fit's argument.
        Damaged files are skipped with a warning naming them; a file of another configuration raises
        InvalidWeightsError saying what differs.
        """
        if not self.resume:
            return None
        self._model, self._fit_model, self._epochs = model, fit_model, epochs
        self._join_run()
        self._claim()
        final = self._load(self.final_filename(), "final", model, fit_model)
        final_epoch = int(final.meta["epoch"]) if final is not None else -1
        chosen, kind = final, "final"
        for round_index, path in sorted(self._own_files().items(), reverse=True):
            if round_index <= final_epoch:
                break  # the final file is newer (rounds after it come from a longer continuation)
            result = self._load(path, "round", model, fit_model)
            if result is not None:
                chosen, kind = result, "round"
                break
        if chosen is None:
            return None
        self._apply(chosen, model, fit_model)
        self._restored = chosen
        epoch = int(chosen.meta["epoch"])
        loss = chosen.meta.get("loss")
        if kind == "round":
            self._resumed = (epoch, loss)
            logging.info("SharedDirectory rank %d: resuming at epoch %d (0-based) from %s.", self.rank, epoch + 1,
                         self.filename(epoch))
            return ResumePoint(epoch + 1, epoch, False)
        if epochs is not None and int(epochs) <= int(chosen.meta.get("epochs") or epoch + 1):
            self._completed = True
            logging.warning("SharedDirectory rank %d already finished this run (%s): fit does nothing and the model "
                            "holds its final weights. For a new run use a fresh directory or another run_id.",
                            self.rank, self.final_filename())
            return ResumePoint(max(int(epochs), epoch + 1), epoch, True)
        round_done = bool(chosen.meta.get("round_done"))
        if not round_done:
            self._losses = {epoch: loss}
        logging.info("SharedDirectory rank %d: continuing at epoch %d (0-based) from %s.", self.rank, epoch + 1,
                     self.final_filename())
        return ResumePoint(epoch + 1, epoch, round_done)

    def _apply(self, result, model, fit_model):
        for weight, array in zip(model.weights, result.arrays):
            _assign(weight, array)
        for variable, array in zip(training_state(model, fit_model), result.state):
            _assign(variable, array)

    def confirm_restore(self, epoch):
        """Called when the first epoch after a restore begins: checks that ``fit`` started where the state ends and
        loads the state again (another callback, e.g. BackupAndRestore, may have loaded weights since)."""
        restored, self._restored = self._restored, None
        if restored is None:
            return
        expected = int(restored.meta["epoch"]) + 1
        if epoch != expected:
            raise RuntimeError(
                f"SharedDirectory rank {self.rank} restored its state after epoch {expected} (1-based) from its own "
                f"files, but fit started at epoch {epoch + 1}: another callback (keras.callbacks.BackupAndRestore?) "
                "or initial_epoch moved the start. SharedDirectory resumes by itself: drop BackupAndRestore, or list "
                "it before Grafting.")
        self._apply(restored, self._model, self._fit_model)

    def finish(self, model, last_epoch, round_done):
        """``fit`` returned: writes the final file (final weights and state: the completion marker), releases."""
        try:
            if self.resume and not self._completed and last_epoch is not None and model is self._model:
                meta = self._meta("final", epoch=int(last_epoch), epochs=self._epochs, round_done=bool(round_done),
                                  loss=self._losses.get(last_epoch))
                write_atomically(self.final_filename(), self._encode(model, meta))
        finally:
            self.close()

