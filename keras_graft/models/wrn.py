"""Wide residual network: Zagoruyko & Komodakis, "Wide Residual Networks" (BMVC 2016).

The pre-activation WRN-d-k of the filter-grafting reference code (fxmeng/filter-grafting,
grafting_cifar/models/wrn.py, after hysts/pytorch_wrn), used by the paper for WRN-28-10.
"""
import keras

from keras_graft.models import _common

BASE_WIDTH = 16


def wide_resnet(
    depth=28,
    width=10,
    num_classes=10,
    dropout=0.0,
    input_shape=(32, 32, 3),
    weight_decay=0.0,
    name=None,
):
    """Pre-activation WRN-``depth``-``width``, channels-last; WRN-28-10 has 36,479,194 trainable weights.

    A 3x3 stem convolution with 16 filters, three stages of ``(depth - 4) / 6`` blocks with 16k, 32k and 64k
    filters (stride 2 at the start of stages 2 and 3), then BN + ReLU, global average pooling and a Dense
    classifier. A block is BN-ReLU-conv3x3 (-dropout) -BN-ReLU-conv3x3 plus a shortcut; where the width
    changes, the shortcut is a 1x1 convolution of the *pre-activated* input, otherwise the identity.

    Being pre-activation, a BN normalises the convolution before it only inside a block ("_conv1" -> "_bn2",
    with a Dropout layer between them when ``dropout > 0``) and for the stem ("stem_conv" ->
    "stage1_block1_bn1"); the other "_bn1" layers and "final_bn" follow an Add.

    Initialisation follows the reference: ``kaiming_normal_`` (fan_in, untruncated) for convolutions, BN gamma
    from U(0, 1) and beta 0, PyTorch's default U(+-1/sqrt(fan_in)) for the classifier's kernel, bias 0.

    Args:
      depth: 6n + 4 for n >= 1 (28 in the paper's experiment).
      width: widening factor k.
      num_classes: size of the classifier's output (logits).
      dropout: dropout rate between the two convolutions of a block (the reference uses 0).
      input_shape: (height, width, channels).
      weight_decay: PyTorch-style coupled weight decay ``wd``, as ``keras.regularizers.L2(wd / 2)`` on every
        trainable weight (see ``cifar_resnet``).
      name: model name; defaults to "wrn<depth>_<width>".

    Returns:
      A functional ``keras.Model`` with layers named "stem_conv",
      "stage<s>_block<b>_{bn,act,conv}{1,2}", "stage<s>_block<b>_{dropout,shortcut_conv,add}",
      "final_bn", "final_act", "pool" and "classifier".
    """
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 for n >= 1 (e.g. 16, 22, 28, 40), got {depth!r}.")
    _common.check_positive_int(width, "width")
    _common.check_positive_int(num_classes, "num_classes")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    blocks = (depth - 4) // 6
    reg = _common.coupled_l2(weight_decay)

    def bn(name):
        return _common.batch_norm(name, reg, gamma_initializer=keras.initializers.RandomUniform(0.0, 1.0))

    inputs = keras.Input(shape=input_shape, name="image")
    x = _common.conv(inputs, BASE_WIDTH, 3, 1, "stem_conv", _common.kaiming_normal(), reg)
    filters_in = BASE_WIDTH
    for stage in range(1, 4):
        filters = BASE_WIDTH * width * 2 ** (stage - 1)
        for block in range(1, blocks + 1):
            prefix = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = bn(f"{prefix}_bn1")(x)
            y = keras.layers.ReLU(name=f"{prefix}_act1")(y)
            if filters_in != filters:
                x = _common.conv(y, filters, 1, strides, f"{prefix}_shortcut_conv", _common.kaiming_normal(), reg)
            y = _common.conv(y, filters, 3, strides, f"{prefix}_conv1", _common.kaiming_normal(), reg)
            if dropout > 0:
                y = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(y)
            y = bn(f"{prefix}_bn2")(y)
            y = keras.layers.ReLU(name=f"{prefix}_act2")(y)
            y = _common.conv(y, filters, 3, 1, f"{prefix}_conv2", _common.kaiming_normal(), reg)
            x = keras.layers.Add(name=f"{prefix}_add")([y, x])
            filters_in = filters
    x = bn("final_bn")(x)
    x = keras.layers.ReLU(name="final_act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = _common.classifier(x, num_classes, _common.torch_default_kernel(), reg)
    return keras.Model(inputs, outputs, name=name or f"wrn{depth}_{width}")
