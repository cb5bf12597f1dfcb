"""Where each Keras layer keeps its filters: the kernel layouts that criteria and grafting rely on."""

import keras

_CONV_TRANSPOSE = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D) + _CONV_TRANSPOSE + _DEPTHWISE + _SEPARABLE
NORMALIZATION = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)


def normalize_axes(axes, rank):
    """``axes`` (an int or a sequence of ints, negatives allowed) as a sorted tuple of non-negative axes."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    normalized = tuple(sorted(a % rank for a in axes))
    if any(not -rank <= a < rank for a in axes) or len(set(normalized)) != len(normalized):
        raise ValueError(f"Invalid filter axes {axes} for a tensor of rank {rank}.")
    return normalized


def is_conv(layer):
    return isinstance(layer, _CONV)


def is_normalization(layer):
    return isinstance(layer, NORMALIZATION)


def has_kernel(layer):
    return is_conv(layer) or isinstance(layer, keras.layers.Dense)


def primary_kernel(layer):
    """(kernel variable, filter axes) of the kernel that defines a layer's output filters.

    SeparableConv's output filters are its pointwise kernel's; DepthwiseConv has one filter per (in, mult) pair;
    Conv*Transpose keeps its output channels on the axis before last.
    """
    if isinstance(layer, _SEPARABLE):
        return layer.pointwise_kernel, (-1,)
    if isinstance(layer, _DEPTHWISE):
        return layer.kernel, (-2, -1)
    if isinstance(layer, _CONV_TRANSPOSE):
        return layer.kernel, (-2,)
    return layer.kernel, (-1,)


def output_axes(layer, variable):
    """Axes of ``variable`` that index the layer's output filters, or None when it has none (e.g. a
    SeparableConv's depthwise kernel, whose channels are the layer's inputs)."""
    if variable.name == "depthwise_kernel":
        return None
    if variable.name in ("kernel", "pointwise_kernel"):
        return primary_kernel(layer)[1]
    if len(variable.shape) == 1:
        return (0,)
    return None


def input_axis(layer):
    """Axis of the primary kernel that indexes the layer's input channels, or None if not one-to-one."""
    if isinstance(layer, _SEPARABLE) or isinstance(layer, _DEPTHWISE):
        return None
    if isinstance(layer, _CONV_TRANSPOSE):
        return -1
    return -2


def filter_layers(model, include_dense=False):
    """Layers whose filters count as filters: every convolution (and Dense with ``include_dense``)."""
    kinds = _CONV + ((keras.layers.Dense,) if include_dense else ())
    return [layer for layer in flatten_layers(model) if isinstance(layer, kinds) and layer.built]


def flatten_layers(model):
    """All leaf layers of a model, nested models expanded, in the model's order."""
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(flatten_layers(layer))
        else:
            leaves.append(layer)
    return leaves
