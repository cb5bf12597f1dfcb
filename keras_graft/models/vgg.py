"""VGG-16 with batch normalisation for CIFAR.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015), with
BatchNormalization after every convolution (Ioffe & Szegedy, 2015) and the single-Dense CIFAR head of the
filter-grafting reference code (fxmeng/filter-grafting, grafting_cifar/models/vgg.py, from kuangliu/pytorch-cifar),
the network of the paper's filter-level grafting experiment.
"""
import keras

from keras_graft.models import _common

# Filters of each convolution, stage by stage; every stage ends with a 2x2 max-pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16_bn(num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0, name=None):
    """The reference CIFAR VGG-16-BN, channels-last; 14,728,266 trainable weights for 10 classes.

    13 blocks of 3x3 conv (with bias, as the reference) + BN + ReLU in five stages, each stage closed by a 2x2
    max-pool, so a 32x32 image ends as 1x1x512; then Flatten and one Dense classifier.

    Initialisation follows the reference, which keeps PyTorch's defaults: kernels from U(+-1/sqrt(fan_in)).
    Biases start at zero (PyTorch draws them from the same range; a conv bias is cancelled by the BN after it).

    Args:
      num_classes: size of the classifier's output (logits). The reference's ``vgg16(n_classes)`` ignores its
        argument and always builds 10 classes; this one does not.
      input_shape: (height, width, channels); the classifier's input is the flattened last feature map.
      weight_decay: PyTorch-style coupled weight decay ``wd``, as ``keras.regularizers.L2(wd / 2)`` on every
        trainable weight (see ``cifar_resnet``).
      name: model name; defaults to "vgg16_bn".

    Returns:
      A functional ``keras.Model`` with layers named "stage<s>_{conv,bn,act}<c>", "stage<s>_pool", "flatten"
      and "classifier".
    """
    _common.check_positive_int(num_classes, "num_classes")
    reg = _common.coupled_l2(weight_decay)

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for stage, widths in enumerate(VGG16_STAGES, start=1):
        prefix = f"stage{stage}"
        for index, filters in enumerate(widths, start=1):
            x = _common.conv(
                x, filters, 3, 1, f"{prefix}_conv{index}", _common.torch_default_kernel(), reg, use_bias=True
            )
            x = _common.batch_norm(f"{prefix}_bn{index}", reg)(x)
            x = keras.layers.ReLU(name=f"{prefix}_act{index}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = _common.classifier(x, num_classes, _common.torch_default_kernel(), reg)
    return keras.Model(inputs, outputs, name=name or "vgg16_bn")
