"""CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), Section 4.2.

The network used by the filter-grafting paper (Meng et al., CVPR 2020) for ResNet-20/32/56/110 and by its
reference code (fxmeng/filter-grafting, grafting_cifar/models/resnet.py and resnet_leaky.py).
"""
import keras

from keras_graft.models import _common

NAMED_DEPTHS = (20, 32, 44, 56, 110)
ACTIVATIONS = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01  # torch.nn.functional.leaky_relu's default, used by the reference resnet_leaky.py


@keras.saving.register_keras_serializable(package="keras_graft")
class ZeroPadShortcut(keras.layers.Layer):
    """Option-A shortcut of He et al.: subsample by ``strides`` and zero-pad the new channels. No weights.

    The new channels are split evenly before and after the existing ones (the extra one goes after when the
    difference is odd).
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides

    def build(self, input_shape):
        if input_shape[-1] > self.filters:
            raise ValueError(f"Cannot pad {input_shape[-1]} channels down to {self.filters}.")

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :]
        extra = self.filters - x.shape[-1]
        before = extra // 2
        return keras.ops.pad(x, [[0, 0], [0, 0], [0, 0], [before, extra - before]])

    def compute_output_shape(self, input_shape):
        def sub(n):
            return None if n is None else -(-n // self.strides)

        return (input_shape[0], sub(input_shape[1]), sub(input_shape[2]), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


def _activation(kind, name):
    if kind == "relu":
        return keras.layers.ReLU(name=name)
    return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, name=name)


def cifar_resnet(
    depth,
    num_classes=10,
    input_shape=(32, 32, 3),
    activation="relu",
    weight_decay=0.0,
    width=16,
    name=None,
):
    """He et al.'s CIFAR ResNet with option-A (parameter-free) shortcuts, channels-last.

    A 3x3 stem convolution, three stages of ``(depth - 2) / 6`` basic blocks with ``width``, ``2 * width`` and
    ``4 * width`` filters (stride 2 at the start of stages 2 and 3), global average pooling and a Dense
    classifier. Convolutions have no bias and are each followed directly by their BatchNormalization. With
    ``width=16`` and 10 classes ResNet-20/32/44/56/110 have 269,722 / 464,154 / 658,586 / 853,018 / 1,727,962
    trainable weights, as the reference (BN moving means and variances add 1376 / 2272 / 3168 / 4064 / 8096
    non-trainable ones).

    Initialisation follows the reference: ``kaiming_normal_`` (fan_in, gain sqrt(2), untruncated) for every
    convolution and for the classifier's kernel; the classifier's bias starts at zero (PyTorch draws it from
    U(+-1/sqrt(fan_in))).

    Args:
      depth: 6n + 2 for n >= 1; the papers use 20, 32, 44, 56 and 110.
      num_classes: size of the classifier's output (logits, no softmax).
      input_shape: (height, width, channels).
      activation: "relu", or "leaky_relu" for the reference's leaky variant (negative slope 0.01, PyTorch's
        default; Keras' LeakyReLU defaults to 0.3).
      weight_decay: PyTorch-style coupled weight decay ``wd``: every trainable weight (kernels, the classifier's
        bias, BN gamma and beta) gets ``keras.regularizers.L2(wd / 2)``, because SGD's ``wd * w`` gradient term is
        the gradient of ``(wd / 2) * ||w||^2`` while Keras' ``L2(l)`` adds ``l * ||w||^2``. The papers use 5e-4.
      width: filters of the first stage (16 in the paper); small values give small test models.
      name: model name; defaults to "resnet<depth>" (+ "_leaky").

    Returns:
      A functional ``keras.Model`` with layers named "stem_conv", "stem_bn", "stem_act",
      "stage<s>_block<b>_{conv,bn,act}{1,2}", "stage<s>_block<b>_shortcut", "stage<s>_block<b>_add",
      "pool" and "classifier".
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"CIFAR ResNet depth must be 6n + 2 for n >= 1 (the papers use {', '.join(map(str, NAMED_DEPTHS))}), "
            f"got {depth!r}."
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}.")
    _common.check_positive_int(num_classes, "num_classes")
    _common.check_positive_int(width, "width")
    blocks = (depth - 2) // 6
    reg = _common.coupled_l2(weight_decay)
    if name is None:
        name = f"resnet{depth}" + ("_leaky" if activation == "leaky_relu" else "")

    inputs = keras.Input(shape=input_shape, name="image")
    x = _common.conv(inputs, width, 3, 1, "stem_conv", _common.kaiming_normal(), reg)
    x = _common.batch_norm("stem_bn", reg)(x)
    x = _activation(activation, "stem_act")(x)
    filters_in = width
    for stage in range(1, 4):
        filters = width * 2 ** (stage - 1)
        for block in range(1, blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = _common.conv(x, filters, 3, strides, f"{prefix}_conv1", _common.kaiming_normal(), reg)
            y = _common.batch_norm(f"{prefix}_bn1", reg)(y)
            y = _activation(activation, f"{prefix}_act1")(y)
            y = _common.conv(y, filters, 3, 1, f"{prefix}_conv2", _common.kaiming_normal(), reg)
            y = _common.batch_norm(f"{prefix}_bn2", reg)(y)
            if strides != 1 or filters_in != filters:
                x = ZeroPadShortcut(filters, strides, name=f"{prefix}_shortcut")(x)
            x = keras.layers.Add(name=f"{prefix}_add")([y, x])
            x = _activation(activation, f"{prefix}_act2")(x)
            filters_in = filters
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = _common.classifier(x, num_classes, _common.kaiming_normal(), reg)
    return keras.Model(inputs, outputs, name=name)
