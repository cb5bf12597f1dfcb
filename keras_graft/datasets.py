"""tf.data input pipelines for the filter-grafting, cultivation and RePr experiments.

Datasets (``NAMES``):

* ``"cifar10"``, ``"cifar100"``: tensorflow-datasets. Training: random crop 32 after 4 pixels of zero padding
  and a random horizontal flip; both splits are normalised by mean (0.4914, 0.4822, 0.4465) and std
  (0.2023, 0.1994, 0.2010), the values of the papers' reference code (which uses them for CIFAR-100 as well).
* ``"fashion_mnist"``: tensorflow-datasets if its data is prepared, otherwise the local IDX files (see
  :func:`fashion_mnist_local`). 28x28x1, normalised by mean 0.2860 and std 0.3530 (the statistics of the
  training images). Training augmentation is the CIFAR recipe at 28 pixels: random crop after 4 pixels of zero
  padding plus a random horizontal flip. Flipping is harmless for clothing (a mirrored shirt is still a shirt),
  unlike digits. ``image_size=32`` zero-pads the images to 32x32 (before augmentation) so that the CIFAR
  networks apply unchanged.
* ``"fashion_mnist_local"``: the same data, always from the IDX files, never through tensorflow-datasets.
* ``"imagenet2012"``: tensorflow-datasets (manual download). Training: random-resized crop (area 8%-100%,
  aspect ratio 3/4-4/3, 10 attempts, whole image as fallback) resized to 224 and a random horizontal flip;
  evaluation: the central 224/256 of the shorter side resized to 224 (the same field of view as "resize to 256,
  centre-crop 224", decoding only the crop). ImageNet mean/std normalisation. ``split="test"`` means
  ``"validation"`` (ImageNet test labels are not public).

Every pipeline yields ``(image float32, label int32)``. Training pipelines shuffle (``shuffle_seed``, a new order
every iteration, reproducible for a given seed) and augment; augmentation randomness comes from
``tf.data.Dataset.random(seed, rerandomize_each_iteration=True)`` feeding stateless random ops, so it is also
reproducible for a given seed and different every epoch.

Caching: CIFAR and Fashion-MNIST are small; with ``cache=True`` (the default) their decoded uint8 images are
read once (when :func:`load` is called) into one in-memory tensor, and the pipeline shuffles *indices* and
gathers whole batches, so the augmentation runs once per batch (vectorised) and the pipelines that
:func:`per_model_dataset_fn` builds for several models share one copy of the data. ``cache=False`` streams from tensorflow-datasets every epoch;
``cache="/some/file"`` streams and caches the decoded, un-augmented examples in that file. ImageNet always
streams: ``cache=True`` keeps the encoded JPEGs in memory only together with ``subset`` (the whole set does not
fit); a filename caches them on disk.

Nothing here downloads unless ``download=True`` is passed: missing data raises :class:`DatasetUnavailableError`
whose message says what to install or download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import logging
import math
import os
import re
import threading
import zlib
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

__all__ = [
    "NAMES",
    "DatasetInfo",
    "DatasetUnavailableError",
    "info",
    "load",
    "load_unbatched",
    "per_model_dataset_fn",
    "read_idx",
    "fashion_mnist_local",
    "fashion_mnist_search_paths",
    "normalize",
    "random_crop_flip",
]

_log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Folder of the Debian package ``dataset-fashion-mnist``.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FASHION_MNIST_DIR"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetUnavailableError(FileNotFoundError):
    """The data of a dataset is not available on this machine; the message says how to get it.

    The message names this module's arguments (``data_dir=DIR``, ``download=True``); a program with other names
    for them (a script's flags) rewords it with :meth:`message_for`.
    """

    def __init__(self, message, explain=None):
        super().__init__(message)
        self._explain = explain

    def message_for(self, data_dir="data_dir=DIR", download="download=True"):
        """The message with the data folder option spelled ``data_dir`` (with its placeholder DIR) and the
        download option spelled ``download``; ``download=None`` leaves out the advice to download."""
        return self._explain(data_dir, download) if self._explain is not None else str(self)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset (no data is read to produce them)."""

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    train_size: int
    test_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    test_split: str  # the split name used for evaluation ("test" or "validation")
    tfds_name: Optional[str]  # None: not read through tensorflow-datasets


_INFOS = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000, CIFAR_MEAN, CIFAR_STD, "test", "cifar10"),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), 50_000, 10_000, CIFAR_MEAN, CIFAR_STD, "test", "cifar100"
    ),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", 10, (28, 28, 1), 60_000, 10_000, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "test",
        "fashion_mnist",
    ),
    "fashion_mnist_local": DatasetInfo(
        "fashion_mnist_local", 10, (28, 28, 1), 60_000, 10_000, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "test",
        None,
    ),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), 1_281_167, 50_000, IMAGENET_MEAN, IMAGENET_STD, "validation",
        "imagenet2012",
    ),
}

#: The dataset names :func:`load` accepts.
NAMES = tuple(_INFOS)

_CROP_PADDING = 4
_IMAGENET_EVAL_RESIZE = 256 / 224  # resize the shorter side to 256 for a 224 centre crop
_IMAGENET_SHUFFLE_BUFFER = 10_000


def _check_name(name: str) -> str:
    if name not in _INFOS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(NAMES)}.")
    return name


def info(name: str, image_size: Optional[int] = None) -> DatasetInfo:
    """Number of classes, input shape, split sizes and normalisation of dataset `name`.

    `image_size` gives the input shape :func:`load` produces with the same argument.
    """
    result = _INFOS[_check_name(name)]
    if image_size is not None:
        result = dataclasses.replace(result, input_shape=(int(image_size), int(image_size), result.input_shape[2]))
    return result


# ----------------------------------------------------------------------------------------------------------
# IDX files (the format of MNIST and Fashion-MNIST)
# ----------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # not gzip: an uncompressed IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad CRC/length, corrupt deflate data
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e}).") from e


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Reads an IDX file (gzipped or not, detected from the content) into a NumPy array.

    Format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32, then the data,
    big-endian, in C order. The array comes back in native byte order and is writable.

    Raises:
      ValueError: the file is not an IDX file, or is truncated, or has bytes after the data.
    """
    path = os.fspath(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(buf)} bytes, shorter than the 4-byte header.")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{int.from_bytes(buf[:4], 'big'):08x} "
            "(expected 0x0000TTNN with type TT in 08, 09, 0B, 0C, 0D, 0E)."
        )
    dtype = _IDX_DTYPES[buf[2]]
    ndim = buf[3]
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX file: {len(buf)} bytes, header needs {header}.")
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    expected = header + count * dtype.itemsize
    if len(buf) < expected:
        raise ValueError(
            f"{path}: truncated IDX file: shape {shape} of {dtype.name} needs {expected} bytes, found {len(buf)}."
        )
    if len(buf) > expected:
        raise ValueError(
            f"{path}: corrupt IDX file: {len(buf) - expected} bytes after the data of shape {shape}."
        )
    array = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def fashion_mnist_search_paths() -> list:
    """Folders searched for the Fashion-MNIST IDX files, in order: $FASHION_MNIST_DIR, the Debian package's
    folder, and Keras' download folder (~/.keras/datasets/fashion-mnist)."""
    paths = []
    if os.environ.get(FASHION_MNIST_ENV):
        paths.append(os.environ[FASHION_MNIST_ENV])
    paths.append(DEBIAN_FASHION_MNIST_DIR)
    paths.append(os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist"))
    return paths


def _idx_file(folder: str, stem: str) -> Optional[str]:
    for candidate in (stem + ".gz", stem):
        p = os.path.join(folder, candidate)
        if os.path.isfile(p):
            return p
    return None


def _fashion_mnist_dir(path: Optional[Union[str, os.PathLike]]) -> str:
    folders = [os.fspath(path)] if path is not None else fashion_mnist_search_paths()
    for folder in folders:
        if all(_idx_file(folder, stem) for pair in _FASHION_MNIST_FILES.values() for stem in pair):
            return folder
    needed = ", ".join(stem + "[.gz]" for pair in _FASHION_MNIST_FILES.values() for stem in pair)

    def explain(data_dir_option, download_option):
        del download_option  # the IDX files are never downloaded here
        return (
            f"Fashion-MNIST IDX files ({needed}) not found in {', '.join(folders)}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (puts them in {DEBIAN_FASHION_MNIST_DIR}), or download them "
            "from https://github.com/zalandoresearch/fashion-mnist (data/fashion) and set "
            f"${FASHION_MNIST_ENV} or pass their folder as {data_dir_option}."
        )

    raise DatasetUnavailableError(explain("data_dir=DIR", "download=True"), explain)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    del mtime_ns, size  # only part of the cache key: a changed file is read again
    array = read_idx(path)
    array.setflags(write=False)
    return array


def _read_split(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    arrays = []
    for stem in _FASHION_MNIST_FILES[split]:
        p = os.path.realpath(_idx_file(folder, stem))
        st = os.stat(p)
        arrays.append(_read_idx_cached(p, st.st_mtime_ns, st.st_size))
    x, y = arrays
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"Fashion-MNIST {split} files in {folder} do not match: images {x.shape}, labels {y.shape}."
        )
    return x, y


def fashion_mnist_local(path: Optional[Union[str, os.PathLike]] = None):
    """Fashion-MNIST from local IDX files: ``(x_train, y_train), (x_test, y_test)``, uint8 arrays of shapes
    (60000, 28, 28), (60000,), (10000, 28, 28), (10000,) -- the layout of ``keras.datasets.fashion_mnist``.

    `path`: folder holding the four files (gzipped or not); by default :func:`fashion_mnist_search_paths`.

    Raises:
      DatasetUnavailableError: the files are not found (the message says how to install them).
      ValueError: a file is corrupt or truncated.
    """
    folder = _fashion_mnist_dir(path)
    (x_train, y_train), (x_test, y_test) = (_read_split(folder, s) for s in ("train", "test"))
    return (x_train.copy(), y_train.copy()), (x_test.copy(), y_test.copy())


# ----------------------------------------------------------------------------------------------------------
# Augmentation and normalisation (vectorised over a batch)
# ----------------------------------------------------------------------------------------------------------


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """(images / 255 - mean) / std, as float32; `images` in [0, 255] of any real or integer dtype."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = tf.constant(1.0 / (255.0 * std), tf.float32)
    offset = tf.constant(-mean / std, tf.float32)
    return tf.cast(images, tf.float32) * scale + offset


def random_crop_flip(images: tf.Tensor, seed: tf.Tensor, padding: int = _CROP_PADDING, flip: bool = True):
    """Per image of a batch: zero-pad by `padding`, take a random crop of the original size, and mirror it
    left-right with probability 1/2 (torchvision ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip``).

    `images`: (batch, height, width, channels), any dtype, e.g. uint8 before normalisation (then the padding is
    black, as in the reference code). `seed`: shape-[2] integer seed of the stateless random ops. Two gathers,
    no per-image loop.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    span = 2 * padding + 1
    off_y = tf.random.stateless_uniform([batch], seeds[0], 0, span, dtype=tf.int32)
    off_x = tf.random.stateless_uniform([batch], seeds[1], 0, span, dtype=tf.int32)
    rows = off_y[:, None] + tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    if flip:
        mirrored = tf.random.stateless_uniform([batch], seeds[2], 0, 2, dtype=tf.int32) > 0
        cols = tf.where(mirrored[:, None], width - 1 - cols, cols)
    cols = off_x[:, None] + cols
    padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    return tf.ensure_shape(out, images.shape)


def _pad_to(images: tf.Tensor, image_size: Optional[int]) -> tf.Tensor:
    if image_size is None or images.shape[-3] == image_size and images.shape[-2] == image_size:
        return images
    return tf.image.resize_with_crop_or_pad(images, image_size, image_size)


def _small_transform(dsinfo: DatasetInfo, augment: bool, image_size: Optional[int]):
    """(uint8 images (B, H, W, C), labels[, seed]) -> (float32 normalised, int32 labels)."""

    def transform(images, labels, seed=None):
        images = _pad_to(images, image_size)
        if augment:
            images = random_crop_flip(images, tf.stack([seed, tf.constant(0, tf.int64)]))
        return normalize(images, dsinfo.mean, dsinfo.std), tf.cast(labels, tf.int32)

    return transform


def _imagenet_transform(augment: bool, image_size: int):
    """Per example: (encoded JPEG, label[, seed]) -> (float32 normalised (size, size, 3), int32 label)."""

    def transform(encoded, label, seed=None):
        shape = tf.image.extract_jpeg_shape(encoded)
        if augment:
            seeds = tf.random.experimental.stateless_split(tf.stack([seed, tf.constant(0, tf.int64)]), 2)
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                shape,
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
                seed=seeds[0],
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0),
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
        else:
            side = tf.cast(
                tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) / _IMAGENET_EVAL_RESIZE, tf.int32
            )
            side = tf.maximum(side, 1)
            window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.resize(image, [image_size, image_size], method="bilinear")
        if augment:
            image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        image = tf.ensure_shape(image, [image_size, image_size, 3])
        return normalize(image, IMAGENET_MEAN, IMAGENET_STD), tf.cast(label, tf.int32)

    return transform


# ----------------------------------------------------------------------------------------------------------
# Sources: decoded arrays in memory, or a stream from tensorflow-datasets
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """Either `images`/`labels` (whole split in memory, uint8 NHWC / int32) or `stream` (a tf.data.Dataset of
    (image, label) with `subset` and caching already applied)."""

    images: Optional[tf.Tensor] = None
    labels: Optional[tf.Tensor] = None
    stream: Optional[tf.data.Dataset] = None

    @property
    def size(self) -> Optional[int]:
        if self.labels is not None:
            return int(self.labels.shape[0])
        n = int(self.stream.cardinality())
        return n if n >= 0 else None


def _split_for(name: str, split: str) -> str:
    if name == "imagenet2012" and split.split("[")[0] == "test":
        return "validation" + split[len("test"):]
    return split


def _tfds_missing_message(name: str, data_dir: Optional[str], data_dir_option: str = "data_dir=DIR",
                          download_option: Optional[str] = "download=True") -> str:
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if name == "imagenet2012":
        how = (
            "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from "
            "https://image-net.org) in DIR/downloads/manual, run `tfds build imagenet2012 --data_dir=DIR`, "
            f"then pass {data_dir_option}."
        )
    else:
        how = (
            f"Download it with `tfds build {name} --data_dir=DIR` on a machine with internet, copy DIR here and "
            f"pass {data_dir_option} (or set $TFDS_DATA_DIR)"
            + (f", or pass {download_option} where there is internet." if download_option else ".")
        )
    if name == "fashion_mnist":
        how += (
            " Or install the IDX files with `apt-get install dataset-fashion-mnist` (or set "
            f"${FASHION_MNIST_ENV}) and they are used instead."
        )
    return f"Dataset {name} is not prepared in {where} and nothing is downloaded offline. {how}"


def _tfds_missing_error(name: str, data_dir: Optional[str]) -> DatasetUnavailableError:
    return DatasetUnavailableError(_tfds_missing_message(name, data_dir),
                                   lambda option, download: _tfds_missing_message(name, data_dir, option, download))


class _TfdsFolderWarnings(logging.Filter):
    """Drops tensorflow-datasets' warnings about dataset folders it looks into and finds unprepared ("Variant
    folder ... has no dataset_info.json"): when local files stand in for the dataset they are noise."""

    def filter(self, record):
        return not record.getMessage().startswith("Variant folder ")


@contextlib.contextmanager
def _quiet_tfds_folder_warnings(quiet):
    if not quiet:
        yield
        return
    absl_logger = logging.getLogger("absl")
    folder_filter = _TfdsFolderWarnings()
    absl_logger.addFilter(folder_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(folder_filter)


def _tfds_stream(name: str, split: str, data_dir: Optional[str], download: bool) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # imported lazily: slow, and not needed for the local files

    kwargs = {}
    if name == "imagenet2012":
        kwargs["decoders"] = {"image": tfds.decode.SkipDecoding()}  # decode_and_crop_jpeg later
    try:
        return tfds.load(
            _INFOS[name].tfds_name, split=_split_for(name, split), data_dir=data_dir, download=download,
            as_supervised=True, shuffle_files=False, **kwargs,
        )
    except AssertionError as e:  # tfds' "could not find data in ..." when download=False
        if "could not find data" not in str(e):
            raise
        raise _tfds_missing_error(name, data_dir) from e
    except KeyError as e:  # an empty version folder: "splits is empty ... not been generated yet"
        if "not been generated" not in str(e):
            raise
        raise _tfds_missing_error(name, data_dir) from e


def _local_split(split: str) -> Tuple[str, slice]:
    """("train" | "test", example slice) from "train", "test" or a slice of examples such as "train[55000:]"."""
    match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
    if match is None or match.group(1) not in _FASHION_MNIST_FILES:
        raise ValueError(f"Local Fashion-MNIST files have splits 'train' and 'test' (or slices of examples such as "
                         f"'train[:55000]'), not {split!r}.")
    start, stop = (int(bound) if bound else None for bound in match.group(2, 3))
    return match.group(1), slice(start, stop)


def _read_local(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    name, examples = _local_split(split)
    x, y = _read_split(folder, name)
    x, y = x[examples], y[examples]
    if not len(x):
        raise ValueError(f"Fashion-MNIST split {split!r} selects no examples.")
    return x, y


def _arrays_from_stream(ds: tf.data.Dataset) -> Tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for x, y in ds.batch(4096).prefetch(2).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError("The split is empty.")
    return np.concatenate(xs), np.concatenate(ys)


def _to_source(x: np.ndarray, y: np.ndarray, subset: Optional[int]) -> _Source:
    if subset is not None:
        x, y = x[:subset], y[:subset]
    if x.ndim == 3:
        x = x[..., None]
    with tf.device("/cpu:0"):
        return _Source(images=tf.constant(x, tf.uint8), labels=tf.constant(y.astype(np.int32)))


def _make_source(name, split, data_dir, subset, cache, download) -> _Source:
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive number of examples, got {subset}.")
    if name == "fashion_mnist_local":
        x, y = _read_local(_fashion_mnist_dir(data_dir), split)
        return _to_source(x, y, subset)
    local_folder = None
    if name == "fashion_mnist":
        try:
            local_folder = _fashion_mnist_dir(None)
        except DatasetUnavailableError:
            pass
    try:
        # With local IDX files to fall back on, tfds' warnings about its missing folders are noise.
        with _quiet_tfds_folder_warnings(local_folder is not None):
            stream = _tfds_stream(name, split, data_dir, download)
    except DatasetUnavailableError:
        if local_folder is None:
            raise
        _log.info("fashion_mnist: tensorflow-datasets data not prepared; reading the IDX files in %s", local_folder)
        x, y = _read_local(local_folder, split)
        return _to_source(x, y, subset)
    if subset is not None:
        stream = stream.take(subset)
    if name == "imagenet2012":
        if isinstance(cache, str):
            stream = stream.cache(cache)
        elif cache and subset is not None:
            stream = stream.cache()
        elif cache:
            _log.info("imagenet2012: not caching the whole split in memory; pass a filename to cache= instead")
        return _Source(stream=stream)
    if cache is True:
        return _to_source(*_arrays_from_stream(stream), None)
    if cache:
        stream = stream.cache(cache)
    return _Source(stream=stream)


# ----------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------


def _augment_seed(shuffle_seed: Optional[int]) -> Optional[int]:
    # A different stream from the shuffle's, still fixed by shuffle_seed.
    return None if shuffle_seed is None else (int(shuffle_seed) * 1_000_003 + 7_919) % (2**31 - 1)


def _with_seeds(ds: tf.data.Dataset, shuffle_seed: Optional[int]) -> tf.data.Dataset:
    seeds = tf.data.Dataset.random(seed=_augment_seed(shuffle_seed), rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(ds, seeds).map(lambda xy, s: (xy[0], xy[1], s))


def _pipeline(
    name: str,
    source: _Source,
    split: str,
    batch_size: Optional[int],
    training: Optional[bool],
    shuffle_seed: Optional[int],
    prefetch: bool,
    drop_remainder: bool,
    augment: Optional[bool],
    image_size: Optional[int],
    shuffle_buffer: Optional[int],
    input_context: Optional[tf.distribute.InputContext],
) -> tf.data.Dataset:
    dsinfo = _INFOS[name]
    if training is None:
        training = split.split("[")[0] == "train"
    if augment is None:
        augment = training
    if input_context is not None and batch_size is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    parallel = dict(num_parallel_calls=AUTOTUNE, deterministic=True)

    def shard(ds):
        if input_context is None or input_context.num_input_pipelines == 1:
            return ds
        return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)

    def shuffle(ds, default_buffer):
        if not training:
            return ds
        return ds.shuffle(shuffle_buffer or default_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)

    if name == "imagenet2012":
        size = image_size or dsinfo.input_shape[0]
        transform = _imagenet_transform(augment, size)
        ds = shuffle(shard(source.stream), _IMAGENET_SHUFFLE_BUFFER)
        if augment:
            ds = _with_seeds(ds, shuffle_seed)
        ds = ds.map(transform, **parallel)
        if batch_size is not None:
            ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:
        transform = _small_transform(dsinfo, augment, image_size)
        if source.images is not None:
            images, labels = source.images, source.labels
            ds = shuffle(shard(tf.data.Dataset.range(source.size)), source.size)
            if batch_size is not None:
                ds = ds.batch(batch_size, drop_remainder=drop_remainder)
                ds = ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
            else:
                ds = ds.map(lambda i: (images[i], labels[i]))
        else:
            ds = shuffle(shard(source.stream), source.size or dsinfo.train_size)
            if batch_size is not None:
                ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if augment:
            ds = _with_seeds(ds, shuffle_seed)
        if batch_size is not None:
            ds = ds.map(transform, **parallel)
        else:  # the batched transform on batches of one

            def one(image, label, seed=None):
                image, label = transform(image[None], label[None], seed)
                return image[0], label[0]

            ds = ds.map(one, **parallel)
    if prefetch:
        ds = ds.prefetch(AUTOTUNE)
    return ds


def load(
    name: str,
    split: str = "train",
    batch_size: int = 128,
    training: Optional[bool] = None,
    shuffle_seed: Optional[int] = None,
    data_dir: Optional[str] = None,
    subset: Optional[int] = None,
    cache: Union[bool, str] = True,
    prefetch: bool = True,
    drop_remainder: bool = False,
    augment: Optional[bool] = None,
    *,
    image_size: Optional[int] = None,
    download: bool = False,
    shuffle_buffer: Optional[int] = None,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of ``(image float32 normalised, label int32)``.

    Args:
      name: one of :data:`NAMES`.
      split: "train" or "test" (ImageNet: "test" means "validation"); tfds slicing such as "train[:90%]" works
        for the tfds datasets, and slices of examples such as "train[55000:]" for the local Fashion-MNIST files.
      batch_size: examples per batch (global; per replica when `input_context` is given).
      training: shuffle (and, by default, augment); defaults to ``split`` being the training split.
      shuffle_seed: seed of the shuffle and of the augmentation: a fixed seed gives the same sequence of epochs
        in every run, each epoch in a new order. None: a different order in every run.
      data_dir: tensorflow-datasets data folder; for "fashion_mnist_local" the folder of the IDX files.
      subset: keep the first `subset` examples of the split (before shuffling; deterministic).
      cache: see the module docstring: True (in memory), False, or a filename.
      prefetch: end the pipeline with ``prefetch(AUTOTUNE)``.
      drop_remainder: drop the last, smaller batch.
      augment: defaults to `training`.
      image_size: CIFAR / Fashion-MNIST: centre pad (or crop) to this size before augmentation (e.g. 32 for
        Fashion-MNIST on the CIFAR networks); ImageNet: the crop size (default 224).
      download: let tensorflow-datasets download and prepare the data (needs internet).
      shuffle_buffer: default the whole split (indices only, when cached in memory); ImageNet 10000.
      input_context: a ``tf.distribute.InputContext``: shard by its input pipeline and use its per-replica
        batch size (``strategy.distribute_datasets_from_function``).

    Raises:
      ValueError: unknown `name` (the message lists the valid names) or a bad argument.
      DatasetUnavailableError: the data is not on this machine (the message says how to get it).
    """
    _check_name(name)
    source = _make_source(name, split, data_dir, subset, cache, download)
    return _pipeline(
        name, source, split, batch_size, training, shuffle_seed, prefetch, drop_remainder, augment, image_size,
        shuffle_buffer, input_context,
    )


def load_unbatched(
    name: str,
    split: str = "train",
    training: Optional[bool] = None,
    shuffle_seed: Optional[int] = None,
    data_dir: Optional[str] = None,
    subset: Optional[int] = None,
    cache: Union[bool, str] = True,
    prefetch: bool = False,
    augment: Optional[bool] = None,
    *,
    image_size: Optional[int] = None,
    download: bool = False,
    shuffle_buffer: Optional[int] = None,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Like :func:`load`, but one example at a time (shuffled, augmented and normalised per example), for
    callers that batch themselves. Slower than :func:`load` for the small datasets, whose augmentation is
    vectorised over batches."""
    _check_name(name)
    source = _make_source(name, split, data_dir, subset, cache, download)
    return _pipeline(
        name, source, split, None, training, shuffle_seed, prefetch, False, augment, image_size,
        shuffle_buffer, input_context,
    )


def per_model_dataset_fn(
    name: str,
    batch_size: int = 128,
    split: str = "train",
    base_seed: Optional[int] = 0,
    **kwargs,
) -> Callable[..., tf.data.Dataset]:
    """A function ``(model_index, input_context=None, epoch=0) -> tf.data.Dataset`` giving each model of a
    multi-model trainer its own data order: shuffle seed ``base_seed + model_index + 1_000_003 * epoch`` (None:
    unseeded). GraftTrainer passes the epoch, so every epoch has a new order and a resumed epoch the same one.

    With an `input_context` (``strategy.distribute_datasets_from_function(lambda ctx: fn(k, ctx))``) the
    dataset is sharded by ``input_context.input_pipeline_id`` over ``num_input_pipelines`` and batched with
    ``input_context.get_per_replica_batch_size(batch_size)``. The data is read once, on the first call, and
    shared by all the models' pipelines. `kwargs` go to :func:`load` (training, subset, cache, image_size...).
    """
    _check_name(name)
    if "shuffle_seed" in kwargs:
        raise TypeError("per_model_dataset_fn sets shuffle_seed itself; pass base_seed.")
    source_keys = ("data_dir", "subset", "cache", "download")
    source_kwargs = {k: kwargs.pop(k) for k in source_keys if k in kwargs}
    source_kwargs.setdefault("cache", True)
    lock = threading.Lock()
    sources = []

    def get_source() -> _Source:
        with lock:
            if not sources:
                sources.append(
                    _make_source(
                        name, split, source_kwargs.get("data_dir"), source_kwargs.get("subset"),
                        source_kwargs["cache"], source_kwargs.get("download", False),
                    )
                )
            return sources[0]

    load_kwargs = dict(
        training=None, prefetch=True, drop_remainder=False, augment=None, image_size=None, shuffle_buffer=None
    )
    unknown = set(kwargs) - set(load_kwargs)
    if unknown:
        raise TypeError(f"Unexpected arguments for per_model_dataset_fn: {sorted(unknown)}")
    load_kwargs.update(kwargs)

    def dataset_fn(model_index: int, input_context: Optional[tf.distribute.InputContext] = None, epoch: int = 0):
        seed = None if base_seed is None else int(base_seed) + int(model_index) + 1_000_003 * int(epoch)
        return _pipeline(
            name, get_source(), split, batch_size, load_kwargs["training"], seed, load_kwargs["prefetch"],
            load_kwargs["drop_remainder"], load_kwargs["augment"], load_kwargs["image_size"],
            load_kwargs["shuffle_buffer"], input_context,
        )

    return dataset_fn
