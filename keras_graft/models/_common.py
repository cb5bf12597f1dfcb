"""Pieces shared by the CIFAR networks.

The papers train PyTorch models, so the helpers here reproduce PyTorch's defaults in Keras terms:

* initialisers: PyTorch draws from an *untruncated* normal or a uniform distribution; Keras' ``HeNormal``
  truncates at two standard deviations, which changes the value histogram (and so the entropy criterion) at
  initialisation. ``VarianceScaling`` with ``"untruncated_normal"`` / ``"uniform"`` gives PyTorch's draws.
* BatchNormalization: PyTorch's ``momentum=0.1, eps=1e-5`` are Keras' ``momentum=0.9, epsilon=1e-5``.
* weight decay: PyTorch's SGD ``weight_decay=wd`` adds ``wd * w`` to the gradient of every parameter, which is the
  gradient of ``(wd / 2) * ||w||^2``; Keras' ``L2(l)`` adds ``l * ||w||^2`` to the loss, so ``l = wd / 2``.
"""
import keras

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def kaiming_normal():
    """``torch.nn.init.kaiming_normal_`` with its defaults: N(0, 2 / fan_in), untruncated."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_in", distribution="untruncated_normal")


def torch_default_kernel(mode="fan_in"):
    """PyTorch's default Conv/Linear kernel initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    PyTorch's fan_in of a depthwise kernel is kh*kw; Keras computes kh*kw*in for a (kh, kw, in, 1) kernel and
    kh*kw as its fan_out, so depthwise kernels pass ``mode="fan_out"``.
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode=mode, distribution="uniform")


def coupled_l2(weight_decay):
    """The L2 regulariser equivalent to PyTorch's SGD ``weight_decay`` (None when it is 0)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    return keras.regularizers.L2(weight_decay / 2.0) if weight_decay > 0 else None


def batch_norm(name, regularizer, gamma_initializer="ones"):
    """BatchNormalization over the channel (last) axis with PyTorch's momentum and epsilon.

    ``regularizer`` applies to gamma and beta, as PyTorch's SGD weight decay does.
    """
    return keras.layers.BatchNormalization(
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        gamma_initializer=gamma_initializer,
        gamma_regularizer=regularizer,
        beta_regularizer=regularizer,
        name=name,
    )


def conv(x, filters, kernel_size, strides, name, kernel_initializer, regularizer, use_bias=False):
    """A 2-D convolution padded like PyTorch's ``padding=kernel_size // 2``.

    For stride 1 that is Keras' "same". For stride 2 on an even input, "same" pads only after the image, which
    shifts the sampling grid by one pixel against PyTorch's (and against the option-A shortcut); an explicit
    symmetric ZeroPadding2D layer (``<name>_pad``) before a "valid" convolution keeps PyTorch's grid.
    """
    pad = kernel_size // 2
    if strides > 1 and pad > 0:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=regularizer,
        bias_regularizer=regularizer if use_bias else None,
        name=name,
    )(x)


def classifier(x, num_classes, kernel_initializer, regularizer):
    """The final Dense layer (named "classifier"), bias initialised to zero."""
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=kernel_initializer,
        kernel_regularizer=regularizer,
        bias_regularizer=regularizer,
        name="classifier",
    )(x)


def check_positive_int(value, what):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
