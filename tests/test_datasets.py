"""Tests of keras_graft.datasets: tfds pipelines on mock data, the real Fashion-MNIST IDX files, the IDX reader,
per-model data orders and the error messages."""

import gzip
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import parameterized

from keras_graft import datasets as D

import testing_utils

_HAVE_LOCAL_FMNIST = all(
    os.path.isfile(os.path.join(D.DEBIAN_FASHION_MNIST_DIR, f))
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
)


def _idx_bytes(array, code):
    """A reference IDX writer: magic 0x0000TTNN, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.asarray(array, dtype).tobytes()


def _collect(ds):
    xs, ys = zip(*ds.as_numpy_iterator())
    return np.concatenate(xs), np.concatenate(ys)


class InfoTest(tf.test.TestCase):

    def test_info(self):
        i = D.info("cifar10")
        self.assertEqual((i.num_classes, i.input_shape, i.train_size, i.test_size), (10, (32, 32, 3), 50000, 10000))
        self.assertEqual(D.info("cifar100").num_classes, 100)
        self.assertEqual(D.info("fashion_mnist").input_shape, (28, 28, 1))
        self.assertEqual(D.info("fashion_mnist_local", image_size=32).input_shape, (32, 32, 1))
        i = D.info("imagenet2012")
        self.assertEqual((i.num_classes, i.input_shape, i.train_size, i.test_size),
                         (1000, (224, 224, 3), 1281167, 50000))
        self.assertEqual(set(D.NAMES), {"cifar10", "cifar100", "imagenet2012", "fashion_mnist",
                                        "fashion_mnist_local"})

    def test_unknown_name(self):
        for fn in (D.info, D.load, D.load_unbatched, D.per_model_dataset_fn):
            with self.assertRaisesRegex(ValueError, "valid names: cifar10, cifar100.*fashion_mnist_local"):
                fn("mnist")


class AugmentTest(tf.test.TestCase):

    def test_random_crop_flip_matches_numpy(self):
        n, h, w, p = 512, 32, 32, 4
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        image = np.stack([rows + 1, cols + 1], axis=-1).astype(np.uint8)  # 0 only in the padding
        images = np.repeat(image[None], n, axis=0)
        out = D.random_crop_flip(images, tf.constant([3, 4], tf.int64), padding=p).numpy()
        self.assertEqual(out.shape, images.shape)
        self.assertEqual(out.dtype, np.uint8)
        padded = np.pad(image, [(p, p), (p, p), (0, 0)])
        offsets_y, offsets_x, flips = set(), set(), []
        for b in range(n):
            oy = int(out[b, 16, 16, 0]) - 1 - 16 + p
            flipped = out[b, 16, 17, 1] < out[b, 16, 16, 1]
            ox = int(out[b, 16, 16, 1]) - 1 + p - (w - 1 - 16 if flipped else 16)
            expected = padded[oy:oy + h, ox:ox + w]
            if flipped:
                expected = expected[:, ::-1]
            np.testing.assert_array_equal(out[b], expected)
            offsets_y.add(oy)
            offsets_x.add(ox)
            flips.append(flipped)
        self.assertEqual(offsets_y, set(range(2 * p + 1)))
        self.assertEqual(offsets_x, set(range(2 * p + 1)))
        self.assertBetween(np.mean(flips), 0.4, 0.6)

    def test_normalize(self):
        x = np.array([[0, 128, 255]], np.uint8)
        np.testing.assert_allclose(D.normalize(x, (0.5,), (0.25,)).numpy(),
                                   (x / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


class MockTfdsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.product(name=["cifar10", "cifar100", "fashion_mnist"], cache=[True, False])
    def test_small_datasets(self, name, cache):
        i = D.info(name)
        n = 10
        with tfds.testing.mock_data(num_examples=n):
            raw_x, raw_y = _collect(tfds.load(name, split="test", as_supervised=True).batch(n))
            test = D.load(name, "test", batch_size=4, cache=cache)
            train = D.load(name, "train", batch_size=4, cache=cache, shuffle_seed=1)
            train_again = D.load(name, "train", batch_size=4, cache=cache, shuffle_seed=1)
            x, y = _collect(test)
            tx, ty = _collect(train)
            tx2, ty2 = _collect(train)  # the next epoch
            ax, ay = _collect(train_again)
        self.assertEqual(x.shape, (n,) + i.input_shape)
        self.assertEqual(x.dtype, np.float32)
        self.assertEqual(y.dtype, np.int32)
        # Evaluation: source order, no augmentation, exact normalisation.
        np.testing.assert_array_equal(y, raw_y)
        np.testing.assert_allclose(x, (raw_x / 255.0 - np.array(i.mean)) / np.array(i.std), atol=1e-5)
        # Training: same shapes, labels in range, values of normalised pixels (or the black padding).
        self.assertEqual(tx.shape, x.shape)
        self.assertTrue(np.all((ty >= 0) & (ty < i.num_classes)))
        self.assertCountEqual(ty, raw_y)
        pixels = (tx * np.array(i.std) + np.array(i.mean)) * 255.0
        self.assertAllInRange(pixels.round(), 0, 255)
        np.testing.assert_allclose(pixels, pixels.round(), atol=1e-3)
        self.assertFalse(np.allclose(tx, x))
        # Same seed: same epochs; the next epoch differs.
        np.testing.assert_array_equal(tx, ax)
        np.testing.assert_array_equal(ty, ay)
        self.assertFalse(np.array_equal(tx, tx2))

    def test_training_flag_and_augment(self):
        with tfds.testing.mock_data(num_examples=8):
            x, y = _collect(D.load("cifar10", "test", batch_size=8))
            ex, ey = _collect(D.load("cifar10", "train", batch_size=8, training=False))
            nx, ny = _collect(D.load("cifar10", "train", batch_size=8, shuffle_seed=0, augment=False))
        np.testing.assert_array_equal(ey, y)  # mock train and test hold the same examples
        np.testing.assert_allclose(ex, x)
        # Shuffled but not augmented: a permutation of the evaluation images.
        order = [int(np.argmin(np.abs(x - img).sum(axis=(1, 2, 3)))) for img in nx]
        self.assertCountEqual(order, range(8))
        np.testing.assert_allclose(nx, x[order])

    def test_subset_padding_drop_remainder_unbatched(self):
        with tfds.testing.mock_data(num_examples=10):
            ds = D.load("fashion_mnist", "train", batch_size=4, subset=7, image_size=32, drop_remainder=True,
                        shuffle_seed=0)
            self.assertEqual(ds.element_spec[0].shape.as_list(), [4, 32, 32, 1])
            self.assertEqual(int(ds.cardinality()), 1)
            ub = D.load_unbatched("cifar10", "train", shuffle_seed=0, subset=5)
            self.assertEqual(ub.element_spec[0].shape.as_list(), [32, 32, 3])
            ux, uy = zip(*ub.as_numpy_iterator())
            ex, ey = _collect(D.load("cifar10", "test", batch_size=5, subset=5))
        self.assertLen(ux, 5)
        self.assertCountEqual(uy, ey)
        self.assertEqual(np.stack(ux).dtype, np.float32)

    def test_file_cache(self):
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), "cifar_test")
        with tfds.testing.mock_data(num_examples=6):
            x, y = _collect(D.load("cifar10", "test", batch_size=4, cache=path))
            ref_x, ref_y = _collect(D.load("cifar10", "test", batch_size=4))
        self.assertTrue(os.path.exists(path + ".index"))
        np.testing.assert_array_equal(y, ref_y)
        np.testing.assert_allclose(x, ref_x)

    def test_imagenet(self):
        with tfds.testing.mock_data(num_examples=3):
            train = D.load("imagenet2012", "train", batch_size=2, shuffle_seed=0)
            x, y = next(iter(train))
            ex, ey = _collect(D.load("imagenet2012", "test", batch_size=2, image_size=64))
        self.assertEqual(x.shape, (2, 224, 224, 3))
        self.assertEqual(x.dtype, tf.float32)
        self.assertEqual(y.dtype, tf.int32)
        self.assertEqual(ex.shape, (3, 64, 64, 3))
        self.assertTrue(np.all((ey >= 0) & (ey < 1000)))
        lo = (0 - np.array(D.IMAGENET_MEAN)) / np.array(D.IMAGENET_STD)
        hi = (1 - np.array(D.IMAGENET_MEAN)) / np.array(D.IMAGENET_STD)
        self.assertTrue(np.all(ex >= lo - 1e-4) and np.all(ex <= hi + 1e-4))
        self.assertTrue(np.all(x.numpy() >= lo - 1e-4) and np.all(x.numpy() <= hi + 1e-4))


class MissingDataTest(tf.test.TestCase):

    def test_tfds_not_prepared(self):
        empty = self.get_temp_dir()
        with self.assertRaisesRegex(D.DatasetUnavailableError, r"tfds build cifar10 .*data_dir="):
            D.load("cifar10", data_dir=empty)
        with self.assertRaisesRegex(D.DatasetUnavailableError, r"downloads/manual.*tfds build imagenet2012"):
            D.load("imagenet2012", "test", data_dir=empty)

    def test_fashion_mnist_nowhere(self):
        empty = tempfile.mkdtemp(dir=self.get_temp_dir())
        with self.assertRaisesRegex(D.DatasetUnavailableError, "apt-get install dataset-fashion-mnist"):
            D.fashion_mnist_local(empty)
        with mock.patch.object(D, "fashion_mnist_search_paths", return_value=[empty]):
            with self.assertRaisesRegex(
                D.DatasetUnavailableError, r"tfds build fashion_mnist.*apt-get install dataset-fashion-mnist"
            ):
                D.load("fashion_mnist", data_dir=empty)


    def test_message_for_other_option_names(self):
        empty = self.get_temp_dir()
        with self.assertRaises(D.DatasetUnavailableError) as raised:
            D.load("cifar10", data_dir=empty)
        self.assertIn("pass data_dir=DIR", str(raised.exception))
        self.assertIn("download=True", str(raised.exception))
        script = raised.exception.message_for(data_dir="--data_dir=DIR", download=None)
        self.assertIn("pass --data_dir=DIR", script)
        self.assertNotIn("download", script.replace("downloaded offline", ""))
        missing = tempfile.mkdtemp(dir=self.get_temp_dir())
        with self.assertRaises(D.DatasetUnavailableError) as raised:
            D.fashion_mnist_local(missing)
        self.assertIn("pass their folder as --data_dir=DIR",
                      raised.exception.message_for(data_dir="--data_dir=DIR", download=None))


class ReadIdxTest(tf.test.TestCase, parameterized.TestCase):

    def _write(self, data, name="a.idx", compress=False):
        path = os.path.join(tempfile.mkdtemp(dir=self.get_temp_dir()), name)
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if compress else data)
        return path

    @parameterized.parameters(
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-3, 1, 7], np.int8), 0x09),
        (np.array([[-300, 2], [5, 30000]], np.int16), 0x0B),
        (np.array([-(2**31), 2**31 - 1], np.int32), 0x0C),
        (np.array([[0.5, -1.25]], np.float32), 0x0D),
        (np.array([1e300, -2.5], np.float64), 0x0E),
    )
    def test_round_trip(self, array, code):
        for compress in (False, True):
            out = D.read_idx(self._write(_idx_bytes(array, code), compress=compress))
            self.assertEqual(out.shape, array.shape)
            self.assertEqual(out.dtype, array.dtype)
            np.testing.assert_array_equal(out, array)
            self.assertTrue(out.flags.writeable)

    def test_corrupt_files(self):
        good = _idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08)
        with self.assertRaisesRegex(ValueError, "truncated IDX file.*needs 76 bytes, found 70"):
            D.read_idx(self._write(good[:-6]))
        with self.assertRaisesRegex(ValueError, "truncated IDX file.*header"):
            D.read_idx(self._write(good[:10]))
        with self.assertRaisesRegex(ValueError, "truncated IDX file.*shorter than the 4-byte header"):
            D.read_idx(self._write(good[:2]))
        with self.assertRaisesRegex(ValueError, "bad magic number 0x504b0304"):
            D.read_idx(self._write(b"PK\x03\x04" + good[4:]))
        with self.assertRaisesRegex(ValueError, "2 bytes after the data"):
            D.read_idx(self._write(good + b"\x00\x00"))
        gz = gzip.compress(good)
        with self.assertRaisesRegex(ValueError, "corrupt or truncated gzip"):
            D.read_idx(self._write(gz[: len(gz) // 2]))
        corrupted = bytearray(gz)
        corrupted[-8] ^= 0xFF  # CRC
        with self.assertRaisesRegex(ValueError, "corrupt or truncated gzip"):
            D.read_idx(self._write(bytes(corrupted)))

    def test_truncated_real_file(self):
        if not _HAVE_LOCAL_FMNIST:
            self.skipTest("dataset-fashion-mnist is not installed")
        src = os.path.join(D.DEBIAN_FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")
        with gzip.open(src) as f:
            raw = f.read()
        with self.assertRaisesRegex(ValueError, "truncated IDX file"):
            D.read_idx(self._write(raw[:5000]))
        folder = tempfile.mkdtemp(dir=self.get_temp_dir())
        for name in os.listdir(D.DEBIAN_FASHION_MNIST_DIR):
            shutil.copy(os.path.join(D.DEBIAN_FASHION_MNIST_DIR, name), folder)
        with open(src, "rb") as f:
            gz = f.read()
        with open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(gz[:3000])
        with self.assertRaisesRegex(ValueError, "t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
            D.fashion_mnist_local(folder)


class LocalFashionMnistTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        if not _HAVE_LOCAL_FMNIST:
            self.skipTest("dataset-fashion-mnist is not installed")

    def test_arrays(self):
        (x_train, y_train), (x_test, y_test) = D.fashion_mnist_local()
        self.assertEqual(x_train.shape, (60000, 28, 28))
        self.assertEqual(y_train.shape, (60000,))
        self.assertEqual(x_test.shape, (10000, 28, 28))
        self.assertEqual(y_test.shape, (10000,))
        self.assertEqual(x_train.dtype, np.uint8)
        np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
        np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
        # The normalisation constants are the training set's statistics.
        pixels = x_train / 255.0
        self.assertAllClose(pixels.mean(), D.FASHION_MNIST_MEAN[0], atol=5e-4)
        self.assertAllClose(pixels.std(), D.FASHION_MNIST_STD[0], atol=5e-4)

    def test_pipeline(self):
        ds = D.load("fashion_mnist_local", "train", batch_size=1000, training=False)
        self.assertEqual(int(ds.cardinality()), 60)
        x, y = _collect(D.load("fashion_mnist_local", "test", batch_size=500, subset=2000))
        self.assertEqual(x.shape, (2000, 28, 28, 1))
        self.assertEqual(y.dtype, np.int32)
        self.assertAllInRange(y, 0, 9)
        self.assertAllClose(x.mean(), 0.0, atol=0.05)
        self.assertAllClose(x.std(), 1.0, atol=0.05)
        (_, _), (x_test, y_test) = D.fashion_mnist_local()
        np.testing.assert_array_equal(y, y_test[:2000])

    def test_tfds_name_falls_back_to_local_files(self):
        ds = D.load("fashion_mnist", "test", batch_size=2500, data_dir=self.get_temp_dir(), image_size=32)
        self.assertEqual(int(ds.cardinality()), 4)
        self.assertEqual(ds.element_spec[0].shape.as_list(), [None, 32, 32, 1])

    def test_fallback_to_local_files_warns_nothing(self):
        empty = tempfile.mkdtemp(dir=self.get_temp_dir())
        with self.assertNoLogs(level="WARNING"):
            ds = D.load("fashion_mnist", "test", batch_size=1000, subset=2000, data_dir=empty)
        self.assertEqual(int(ds.cardinality()), 2)
        # An empty version folder (a tfds build that never finished) falls back too.
        half_built = tempfile.mkdtemp(dir=self.get_temp_dir())
        os.makedirs(os.path.join(half_built, "fashion_mnist", "3.0.1"))
        with self.assertNoLogs(level="WARNING"):
            ds = D.load("fashion_mnist", "test", batch_size=1000, subset=2000, data_dir=half_built)
        self.assertEqual(int(ds.cardinality()), 2)
        # tfds does warn there when asked directly: the test above would see it.
        with self.assertLogs(level="WARNING") as logs:
            with self.assertRaises(D.DatasetUnavailableError):
                D._tfds_stream("fashion_mnist", "test", empty, False)
        self.assertTrue(any("Variant folder" in line for line in logs.output), logs.output)


class PerModelTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        if not _HAVE_LOCAL_FMNIST:
            self.skipTest("dataset-fashion-mnist is not installed")

    def test_orders(self):
        fn = D.per_model_dataset_fn("fashion_mnist_local", 64, subset=512, base_seed=10)
        x0, y0 = _collect(fn(0))
        again = fn(0)
        x0b, y0b = _collect(again)
        _, y0c = _collect(again)  # second epoch of the same pipeline
        x1, y1 = _collect(fn(1))
        np.testing.assert_array_equal(y0, y0b)
        np.testing.assert_array_equal(x0, x0b)
        self.assertFalse(np.array_equal(y0, y1))
        self.assertFalse(np.array_equal(y0, y0c))
        self.assertCountEqual(y0, y1)
        # Same seed through load() gives the same order as the per-model function.
        _, yl = _collect(D.load("fashion_mnist_local", batch_size=64, subset=512, shuffle_seed=10))
        np.testing.assert_array_equal(y0, yl)

    def test_input_context_shards(self):
        fn = D.per_model_dataset_fn("fashion_mnist_local", 64, split="test", subset=200, training=False)
        ref, _ = _collect(D.load("fashion_mnist_local", "test", subset=200))
        parts = []
        for pipeline in range(2):
            ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=2)
            ds = fn(0, ctx)
            self.assertEqual(next(iter(ds))[0].shape[0], 32)
            parts.append(_collect(ds)[0])
        np.testing.assert_allclose(parts[0], ref[0::2])
        np.testing.assert_allclose(parts[1], ref[1::2])

    def test_mirrored_strategy(self):
        cpus = tf.config.list_logical_devices("CPU")
        if len(cpus) < 2:
            self.skipTest("needs two logical CPUs (tests/conftest.py)")
        strategy = testing_utils.mirrored_strategy()
        fn = D.per_model_dataset_fn("fashion_mnist_local", 64, subset=256, base_seed=0)
        dist = strategy.distribute_datasets_from_function(lambda ctx: fn(1, ctx))
        x, y = next(iter(dist))
        xs = strategy.experimental_local_results(x)
        self.assertLen(xs, 2)
        self.assertEqual(xs[0].shape, (32, 28, 28, 1))


if __name__ == "__main__":
    tf.test.main()
