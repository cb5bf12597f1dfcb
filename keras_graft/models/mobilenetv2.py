"""MobileNetV2 for CIFAR: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018).

The CIFAR variant of the filter-grafting reference code (fxmeng/filter-grafting, grafting_cifar/models/
mobilenetv2.py, itself from kuangliu/pytorch-cifar): the stem and the first stride-2 stage (24 filters) use
stride 1, so a 32x32 image reaches the head at 4x4. Two details differ from the paper and are kept because the
reference (and its parameter count) has them: every block has a 1x1 expansion convolution, also when the
expansion factor is 1, and a stride-1 block whose input and output widths differ adds a 1x1 convolution + BN
shortcut instead of having none.
"""
import keras

from keras_graft.models import _common

# (expansion, output filters, blocks, stride of the first block) for each stage.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def _make_divisible(value, divisor=8):
    """Round a scaled width to a multiple of ``divisor``, never more than 10% below it (the paper's code)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(x, filters, kernel_size, strides, prefix, reg, relu):
    x = _common.conv(x, filters, kernel_size, strides, f"{prefix}_conv", _common.torch_default_kernel(), reg)
    x = _common.batch_norm(f"{prefix}_bn", reg)(x)
    return keras.layers.ReLU(name=f"{prefix}_act")(x) if relu else x


def _depthwise_bn_relu(x, strides, prefix, reg):
    if strides > 1:
        x = keras.layers.ZeroPadding2D(1, name=f"{prefix}_conv_pad")(x)
    x = keras.layers.DepthwiseConv2D(
        3,
        strides=strides,
        padding="valid" if strides > 1 else "same",
        use_bias=False,
        depthwise_initializer=_common.torch_default_kernel(mode="fan_out"),
        depthwise_regularizer=reg,
        name=f"{prefix}_conv",
    )(x)
    x = _common.batch_norm(f"{prefix}_bn", reg)(x)
    return keras.layers.ReLU(name=f"{prefix}_act")(x)


def mobilenet_v2(num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0, width_multiplier=1.0, name=None):
    """The reference CIFAR MobileNetV2, channels-last; 2,296,922 trainable weights for 10 classes.

    Inverted residual blocks: 1x1 expansion conv + BN + ReLU, 3x3 depthwise conv + BN + ReLU, 1x1 linear
    projection conv + BN, and a residual connection in stride-1 blocks. Then a 1x1 conv to 1280 filters + BN +
    ReLU, global average pooling and a Dense classifier.

    Initialisation follows the reference, which keeps PyTorch's defaults: kernels from U(+-1/sqrt(fan_in)),
    where a depthwise filter's fan_in is its 3x3 window; the classifier's bias starts at zero.

    Args:
      num_classes: size of the classifier's output (logits).
      input_shape: (height, width, channels).
      weight_decay: PyTorch-style coupled weight decay ``wd``, as ``keras.regularizers.L2(wd / 2)`` on every
        trainable weight (see ``cifar_resnet``).
      width_multiplier: scales every width, rounded to a multiple of 8 as in the paper; the head keeps 1280
        filters unless the multiplier exceeds 1. The reference has no multiplier (1.0).
      name: model name; defaults to "mobilenetv2".

    Returns:
      A functional ``keras.Model`` with layers named "stem_{conv,bn,act}",
      "stage<s>_block<b>_{expand,dw,project,shortcut}_{conv,bn,act}", "stage<s>_block<b>_add",
      "head_{conv,bn,act}", "pool" and "classifier".
    """
    _common.check_positive_int(num_classes, "num_classes")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}.")
    reg = _common.coupled_l2(weight_decay)

    inputs = keras.Input(shape=input_shape, name="image")
    filters_in = _make_divisible(STEM_FILTERS * width_multiplier)
    x = _conv_bn(inputs, filters_in, 3, 1, "stem", reg, relu=True)
    for stage, (expansion, filters, blocks, first_stride) in enumerate(STAGES, start=1):
        filters = _make_divisible(filters * width_multiplier)
        for block in range(1, blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = first_stride if block == 1 else 1
            y = _conv_bn(x, expansion * filters_in, 1, 1, f"{prefix}_expand", reg, relu=True)
            y = _depthwise_bn_relu(y, strides, f"{prefix}_dw", reg)
            y = _conv_bn(y, filters, 1, 1, f"{prefix}_project", reg, relu=False)
            if strides == 1:
                shortcut = x
                if filters_in != filters:
                    shortcut = _conv_bn(x, filters, 1, 1, f"{prefix}_shortcut", reg, relu=False)
                y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = y
            filters_in = filters
    head = HEAD_FILTERS if width_multiplier <= 1 else _make_divisible(HEAD_FILTERS * width_multiplier)
    x = _conv_bn(x, head, 1, 1, "head", reg, relu=True)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = _common.classifier(x, num_classes, _common.torch_default_kernel(), reg)
    return keras.Model(inputs, outputs, name=name or "mobilenetv2")
