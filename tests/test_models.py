"""Tests of keras_graft.models: parameter counts of the reference networks, graph structure, options."""
import os

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from keras_graft import models
from keras_graft.models import _common

# Trainable weights of the PyTorch reference networks (fxmeng/filter-grafting, grafting_cifar/models) for
# CIFAR-10, summed over their parameters: ResNet 97216 n - 21926 for n blocks per stage.
REFERENCE_TRAINABLE = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "mobilenetv2": 2_296_922,
    "vgg16_bn": 14_728_266,
    "wrn28_10": 36_479_194,
}

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def producers(model):
    """Maps each layer name to the layer that produces its (single) input."""
    by_output = {id(layer.output): layer for layer in model.layers}
    return {
        layer.name: by_output.get(id(layer.input))
        for layer in model.layers[1:]
        if not isinstance(layer.input, list)
    }


def small_input(batch=2, shape=(32, 32, 3)):
    return np.random.default_rng(0).normal(size=(batch, *shape)).astype("float32")


class ModelsTest(tf.test.TestCase, parameterized.TestCase):
    _wrn = None

    @classmethod
    def wrn28_10(cls):
        if cls._wrn is None:
            cls._wrn = models.get("wrn28_10")
        return cls._wrn

    @parameterized.parameters(sorted(set(REFERENCE_TRAINABLE) - {"wrn28_10"}))
    def test_trainable_parameters_match_reference(self, name):
        self.assertEqual(trainable_count(models.get(name)), REFERENCE_TRAINABLE[name])

    def test_wrn28_10_parameters_and_output(self):
        model = self.wrn28_10()
        self.assertEqual(trainable_count(model), REFERENCE_TRAINABLE["wrn28_10"])
        self.assertEqual(model(small_input(batch=1), training=False).shape, (1, 10))

    def test_resnet_formula_and_non_trainable(self):
        # 6n + 2 beyond the named depths; BN moving mean and variance: 2 * (width + 2n * 7 * width).
        model = models.cifar_resnet(8)
        self.assertEqual(trainable_count(model), 97216 * 1 - 21926)
        self.assertEqual(model.count_params() - trainable_count(model), 2 * (16 + 2 * 112))

    def test_leaky_variant_has_the_same_parameters(self):
        self.assertEqual(trainable_count(models.get("resnet32_leaky")), REFERENCE_TRAINABLE["resnet32"])

    @parameterized.parameters(0, 7, 21, 22, 100, "20", 20.0)
    def test_bad_resnet_depth(self, depth):
        with self.assertRaisesRegex(ValueError, r"6n \+ 2.*20, 32, 44, 56, 110"):
            models.cifar_resnet(depth)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "activation"):
            models.cifar_resnet(20, activation="gelu")
        with self.assertRaisesRegex(ValueError, "weight_decay"):
            models.cifar_resnet(20, weight_decay=-1e-4)
        with self.assertRaisesRegex(ValueError, "6n \\+ 4"):
            models.wide_resnet(depth=27)
        with self.assertRaisesRegex(ValueError, "num_classes"):
            models.vgg16_bn(num_classes=0)

    def test_unknown_name(self):
        with self.assertRaisesRegex(ValueError, "'resnet_18'.*mobilenetv2, resnet110, resnet110_leaky.*resnet<6n\\+2>"):
            models.get("resnet_18")
        with self.assertRaisesRegex(ValueError, "depth must be 6n \\+ 2 .* got 18"):
            models.get("resnet18")

    def test_names_with_other_depths_and_widths(self):
        self.assertEqual(models.get("resnet8", input_shape=(8, 8, 1)).count_params(),
                         models.cifar_resnet(8, input_shape=(8, 8, 1)).count_params())
        self.assertEqual(models.get("wrn16_2", input_shape=(8, 8, 1)).count_params(),
                         models.wide_resnet(16, 2, input_shape=(8, 8, 1)).count_params())

    def test_available(self):
        expected = ["convnet3", "mobilenetv2", "vgg16_bn", "wrn28_10"]
        for depth in (20, 32, 44, 56, 110):
            expected += [f"resnet{depth}", f"resnet{depth}_leaky"]
        self.assertEqual(models.available(), sorted(expected))

    @parameterized.parameters(
        ("resnet20", {}),
        ("resnet56_leaky", {"width": 4}),
        ("mobilenetv2", {"width_multiplier": 0.25}),
        ("vgg16_bn", {}),
    )
    def test_output_shapes(self, name, kwargs):
        for num_classes in (10, 100):
            model = models.get(name, num_classes=num_classes, **kwargs)
            self.assertEqual(model(small_input(), training=False).shape, (2, num_classes))

    def test_small_wrn_with_dropout(self):
        model = models.wide_resnet(depth=10, width=2, num_classes=5, dropout=0.3)
        self.assertEqual(model.name, "wrn10_2")
        self.assertIsInstance(model.get_layer("stage2_block1_dropout"), keras.layers.Dropout)
        self.assertEqual(model(small_input(), training=True).shape, (2, 5))

    def test_leaky_variant_uses_leaky_relu(self):
        leaky = models.get("resnet20_leaky", width=4)
        self.assertEqual(leaky.name, "resnet20_leaky")
        activations = [l for l in leaky.layers if isinstance(l, (keras.layers.ReLU, keras.layers.LeakyReLU))]
        self.assertLen(activations, 19)  # stem + 2 per block
        for layer in activations:
            self.assertIsInstance(layer, keras.layers.LeakyReLU)
            self.assertAllClose(layer.negative_slope, 0.01)  # PyTorch's default, not Keras' 0.3
        relu = models.get("resnet20", width=4)
        self.assertEmpty([l for l in relu.layers if isinstance(l, keras.layers.LeakyReLU)])
        self.assertLen([l for l in relu.layers if isinstance(l, keras.layers.ReLU)], 19)

    @parameterized.parameters("resnet20", "mobilenetv2", "vgg16_bn")
    def test_weight_decay_is_coupled_l2_on_every_trainable_weight(self, name):
        kwargs = {"width": 4} if name == "resnet20" else {}
        self.assertEmpty(models.get(name, **kwargs).losses)
        wd = 5e-4
        model = models.get(name, weight_decay=wd, **kwargs)
        self.assertLen(model.losses, len(model.trainable_weights))
        expected = wd / 2 * sum(np.sum(np.square(w.numpy().astype("float64"))) for w in model.trainable_weights)
        self.assertAllClose(float(sum(model.losses)), expected, rtol=1e-4)

    def test_resnet20_option_a_shortcut_has_no_weights(self):
        model = models.get("resnet20")
        self.assertLen([l for l in model.layers if isinstance(l, keras.layers.Conv2D)], 19)
        self.assertLen([l for l in model.layers if isinstance(l, keras.layers.Dense)], 1)
        shortcuts = [l for l in model.layers if isinstance(l, models.ZeroPadShortcut)]
        self.assertEqual([l.name for l in shortcuts], ["stage2_block1_shortcut", "stage3_block1_shortcut"])
        for layer in shortcuts:
            self.assertEmpty(layer.weights)

    def test_zero_pad_shortcut_values(self):
        x = small_input(batch=2, shape=(5, 6, 3))
        y = models.ZeroPadShortcut(8, 2)(x)
        expected = np.pad(x[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (2, 3)])
        self.assertAllEqual(y, expected)
        layer = models.ZeroPadShortcut.from_config(models.ZeroPadShortcut(6, 2, name="s").get_config())
        self.assertEqual((layer.filters, layer.strides, layer.name), (6, 2, "s"))

    def test_strided_conv_samples_like_the_shortcut(self):
        # PyTorch's padding=1 grid: a centre-tap 3x3 stride-2 convolution keeps pixels (0, 0), (0, 2), ...
        inputs = keras.Input((8, 8, 1))
        outputs = _common.conv(inputs, 1, 3, 2, "c", keras.initializers.Zeros(), None)
        model = keras.Model(inputs, outputs)
        kernel = np.zeros((3, 3, 1, 1), "float32")
        kernel[1, 1] = 1.0
        model.get_layer("c").kernel.assign(kernel)
        x = small_input(batch=1, shape=(8, 8, 1))
        self.assertAllClose(model(x), x[:, ::2, ::2, :])

    @parameterized.parameters(
        ("resnet20", ["stem_conv", "stage1_block2_conv1", "stage1_block2_bn1", "stage3_block3_bn2", "classifier"]),
        ("mobilenetv2", ["stem_conv", "stage1_block1_shortcut_conv", "stage7_block1_project_bn", "head_bn"]),
        ("vgg16_bn", ["stage1_conv1", "stage1_bn1", "stage5_conv3", "stage5_pool", "classifier"]),
    )
    def test_every_batch_norm_follows_its_conv(self, name, some_names):
        model = models.get(name)
        for layer_name in some_names:
            model.get_layer(layer_name)
        inbound = producers(model)
        bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        convs = [l for l in model.layers if isinstance(l, CONV_TYPES)]
        self.assertLen(bns, len(convs))
        for bn in bns:
            conv = inbound[bn.name]
            self.assertIsInstance(conv, CONV_TYPES)
            head, _, tail = bn.name.rpartition("bn")
            self.assertEqual(conv.name, f"{head}conv{tail}")
            self.assertEqual(conv.output.shape[-1], bn.gamma.shape[0])

    def test_wrn_structure(self):
        model = self.wrn28_10()
        inbound = producers(model)
        self.assertEqual(inbound["stage1_block1_bn1"].name, "stem_conv")
        self.assertEqual(inbound["stage2_block3_bn2"].name, "stage2_block3_conv1")
        self.assertEqual(
            [l.name for l in model.layers if "shortcut" in l.name],
            ["stage1_block1_shortcut_conv", "stage2_block1_shortcut_conv", "stage3_block1_shortcut_conv"],
        )
        self.assertEqual(inbound["stage2_block1_shortcut_conv"].name, "stage2_block1_act1")  # pre-activated
        gamma = model.get_layer("final_bn").gamma.numpy()
        self.assertTrue(np.all((gamma >= 0) & (gamma <= 1)) and gamma.std() > 0.1)  # reference: U(0, 1)

    def test_initialisers_follow_pytorch(self):
        resnet = models.get("resnet20")
        kernel = resnet.get_layer("stage3_block3_conv2").kernel.numpy()
        std = np.sqrt(2.0 / (3 * 3 * 64))
        self.assertAllClose(kernel.std(), std, rtol=0.03)
        self.assertGreater(np.abs(kernel).max(), 3 * std)  # untruncated, unlike keras' HeNormal
        mobilenet = models.get("mobilenetv2", width_multiplier=0.5)
        depthwise = mobilenet.get_layer("stage6_block2_dw_conv").kernel.numpy()
        self.assertBetween(np.abs(depthwise).max(), 0.3, 1.0 / 3.0)  # U(+-1/sqrt(3*3)), PyTorch's fan_in
        pointwise = mobilenet.get_layer("head_conv").kernel.numpy()
        bound = 1.0 / np.sqrt(pointwise.shape[2])
        self.assertBetween(np.abs(pointwise).max(), 0.9 * bound, bound)

    @parameterized.parameters(((32, 32, 3), 24_522, (4, 4)), ((28, 28, 1), 21_706, (3, 3)))
    def test_repr_convnet(self, input_shape, trainable, final_map):
        """RePr's ConvNet: 3 x (3x3 conv of 32 with bias, ReLU, 2x2 max-pool), Flatten, Dense; no BN, no skips."""
        model = models.get("convnet3", input_shape=input_shape)
        self.assertEqual(model.name, "convnet3")
        self.assertEqual(trainable_count(model), trainable)
        self.assertEqual(model.count_params(), trainable)  # no non-trainable weights
        # conv: 3*3*c*32 + 32; classifier: h*w*32*10 + 10.
        expected = sum(9 * c * 32 + 32 for c in (input_shape[-1], 32, 32)) + final_map[0] * final_map[1] * 320 + 10
        self.assertEqual(trainable, expected)
        kinds = [type(l).__name__ for l in model.layers[1:]]
        self.assertEqual(kinds, ["Conv2D", "ReLU", "MaxPooling2D"] * 3 + ["Flatten", "Dense"])
        self.assertEqual(tuple(model.get_layer("pool3").output.shape[1:]), (*final_map, 32))
        self.assertEqual(model(small_input(shape=input_shape), training=False).shape, (2, 10))
        for layer in model.layers:  # PyTorch's default initialisation: U(+-1/sqrt(fan_in)) for kernels and biases
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
                bound = 1.0 / np.sqrt(np.prod(layer.kernel.shape[:-1]))
                for weight in (layer.kernel, layer.bias):
                    self.assertLessEqual(np.abs(weight.numpy()).max(), bound)
                    self.assertGreater(np.abs(weight.numpy()).max(), 0.8 * bound)

    def test_convnet_options(self):
        model = models.convnet(num_layers=8, filters=8, num_classes=5, input_shape=(28, 28, 1), batch_norm=True,
                               weight_decay=5e-4)
        self.assertEqual(model.name, "convnet8_bn")
        self.assertLen([l for l in model.layers if isinstance(l, keras.layers.Conv2D)], 8)
        self.assertLen([l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)], 8)
        self.assertEqual([l.name for l in model.layers if isinstance(l, keras.layers.MaxPooling2D)],
                         ["pool1", "pool2", "pool3"])
        self.assertEqual(producers(model)["pool1"].name, "act3")  # stages of 3, 3 and 2 convolutions
        self.assertEqual(producers(model)["pool3"].name, "act8")
        self.assertIsNone(model.get_layer("conv1").bias)  # BN follows
        self.assertLen(model.losses, len(model.trainable_weights))
        self.assertEqual(model(small_input(shape=(28, 28, 1)), training=False).shape, (2, 5))
        with self.assertRaisesRegex(ValueError, "num_layers"):
            models.convnet(num_layers=0)

    def test_save_and_load(self):
        model = models.cifar_resnet(8, width=4, num_classes=3, activation="leaky_relu")
        path = os.path.join(self.get_temp_dir(), "resnet8.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        x = small_input()
        self.assertAllClose(loaded(x, training=False), model(x, training=False))


if __name__ == "__main__":
    tf.test.main()
