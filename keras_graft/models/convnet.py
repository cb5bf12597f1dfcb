"""The small vanilla ConvNet of RePr (Prakash et al., "RePr: Improved Training of Convolutional Filters", CVPR 2019).

RePr reports its largest gains on small networks without skip connections; its Figure 1 trains "a three layer
ConvNet with 32 filters each" on CIFAR-10 for 100 epochs (standard training 72.1 %, RePr 76.4 %, as quoted by the
re-implementation siahuat0727/RePr). The paper gives no code; the layout here is the one of that public
re-implementation (siahuat0727/RePr, models/vanilla.py): three 3x3 convolutions of 32 filters with padding 1, each
followed by ReLU and a 2x2 max-pool, then one linear classifier on the flattened 4x4x32 map (CIFAR). Its training
protocol (main.py and README): plain SGD (no momentum, no weight decay), lr 0.01, batch 128, random crop 32 with
4 padding and horizontal flip, 100 epochs for the standard scheme and 110 for RePr with S1 = 20, S2 = 10, p = 30 %
(drops after epochs 20, 50, 80, re-initialisations after 30, 60, 90, so three cycles and 20 plain epochs at the end).
"""
import math

import keras

from keras_graft.models import _common


def _torch_bias(fan_in):
    """PyTorch's default bias of Conv/Linear layers: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def _stage_sizes(num_layers):
    """Convolutions per pooling stage: min(3, num_layers) stages, as even as possible, the first ones larger."""
    stages = min(3, num_layers)
    base, extra = divmod(num_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def convnet(num_layers=3, filters=32, num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0, batch_norm=False,
            name=None):
    """RePr's vanilla ConvNet, channels-last: no skip connections, no normalisation by default.

    ``num_layers`` 3x3 convolutions of ``filters`` filters ("same" padding, PyTorch's padding 1), each followed by
    ReLU, grouped in min(3, num_layers) stages that each end with a 2x2 max-pool (for the paper's 3 layers: a pool
    after every convolution, so 32x32 -> 4x4 and 28x28 -> 3x3), then Flatten and one Dense classifier (logits).
    With the defaults and 10 classes: 24,522 trainable weights on 32x32x3 CIFAR images, 21,706 on 28x28x1.

    Initialisation is PyTorch's default, as the re-implementation keeps it: kernels and biases from
    U(+-1/sqrt(fan_in)).

    Args:
      num_layers: convolutions (the paper: 3; deeper vanilla ConvNets stack more per stage).
      filters: filters of every convolution (the paper: 32).
      num_classes: size of the classifier's output.
      input_shape: (height, width, channels).
      weight_decay: PyTorch-style coupled weight decay ``wd``, ``keras.regularizers.L2(wd / 2)`` on every trainable
        weight (the re-implementation uses none).
      batch_norm: a BatchNormalization (PyTorch's momentum and epsilon) between each convolution and its ReLU, and
        convolutions without bias. Not in the paper's ConvNet.
      name: model name; defaults to "convnet<num_layers>" (+ "_bn").

    Returns:
      A functional ``keras.Model`` with layers named "conv<i>", ["bn<i>",] "act<i>" (i = 1..num_layers),
      "pool<s>", "flatten" and "classifier".
    """
    _common.check_positive_int(num_layers, "num_layers")
    _common.check_positive_int(filters, "filters")
    _common.check_positive_int(num_classes, "num_classes")
    reg = _common.coupled_l2(weight_decay)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    index = 0
    for stage, size in enumerate(_stage_sizes(num_layers), start=1):
        for _ in range(size):
            index += 1
            fan_in = 9 * int(x.shape[-1])
            x = keras.layers.Conv2D(
                filters, 3, padding="same", use_bias=not batch_norm,
                kernel_initializer=_common.torch_default_kernel(), bias_initializer=_torch_bias(fan_in),
                kernel_regularizer=reg, bias_regularizer=reg if not batch_norm else None, name=f"conv{index}",
            )(x)
            if batch_norm:
                x = _common.batch_norm(f"bn{index}", reg)(x)
            x = keras.layers.ReLU(name=f"act{index}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{stage}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, kernel_initializer=_common.torch_default_kernel(), bias_initializer=_torch_bias(x.shape[-1]),
        kernel_regularizer=reg, bias_regularizer=reg, name="classifier",
    )(x)
    return keras.Model(inputs, outputs, name=name or f"convnet{num_layers}" + ("_bn" if batch_norm else ""))
