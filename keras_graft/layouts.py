"""Where each layer keeps its filters: the one owner of kernel layouts, and the registry layers opt into.

A *filter* is one output unit of a layer. Keras keeps filters on the last kernel axis (Conv1D/2D/3D
``(..., in, out)``, Dense ``(in, out)``); Conv*Transpose on the axis before last ``(..., out, in)``;
DepthwiseConv ``(..., in, mult)`` has one filter per ``(in, mult)`` pair; SeparableConv's filters are its
pointwise kernel's. A layer takes part in criteria, FilterStats, grafting, scions and RePr when its class (or a
base class: the lookup follows the MRO) is registered::

    @layouts.register(kernel="w", filter_axes=0, input_axis=1)
    class MyConv(keras.layers.Layer):  # self.w has shape (out, in, kh, kw)
        ...

A layer whose class is not registered has no filters: criteria, FilterStats, scions and RePr skip it, and grafting
mixes its weights as a group of its own, informed by its first weight (see :mod:`keras_graft.groups`); at filter
level its weights other than 1-D ones take the group's mean coefficient.

Rows: :func:`to_rows` reshapes a kernel to one row per filter, ``(num_filters, values_per_filter)``, filter axes
moved last (in increasing order) and flattened row-major; :func:`from_rows` inverts it. Both take a NumPy array
(and return one) or anything TensorFlow converts to a tensor (and return a tensor).
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

__all__ = ["FilterLayout", "register", "layout", "normalize_axes", "permutation", "to_rows", "from_rows",
           "filter_shape", "num_filters", "has_kernel", "is_normalization", "primary_kernel", "output_axes",
           "input_axis", "filter_layers", "flatten_layers"]


@dataclasses.dataclass(frozen=True)
class FilterLayout:
    """How a layer class keeps its filters.

    Attributes:
      kernel: name of the attribute holding the kernel that defines the layer's output filters; None for a
        normalisation layer, whose weights are all per channel.
      filter_axes: the kernel's axes that index the output filters (for a normalisation layer: its weights' axis).
      input_axis: the kernel's axis that indexes the layer's input channels one to one, or None (depthwise,
        separable): filter-level grafting mixes input channel j with the coefficient of the filter that feeds it.
      dense: filters counted only where asked for (``include_dense``), as Dense units are.
      depthwise: each filter reads one input channel of its own, so filters share no inputs and RePr's
        orthogonality ranking does not apply (RePr leaves such layers alone).
    """

    kernel: str = "kernel"
    filter_axes: tuple = (-1,)
    input_axis: int = None
    dense: bool = False
    depthwise: bool = False

    @property
    def normalization(self):
        return self.kernel is None


_REGISTRY = {}


def register(layer_class=None, kernel="kernel", filter_axes=-1, input_axis=None, dense=False, depthwise=False):
    """Registers where ``layer_class`` (and its subclasses) keep their filters; see :class:`FilterLayout`.

    ``register(MyConv, kernel="w", filter_axes=0)`` or, as a class decorator,
    ``@register(kernel="w", filter_axes=0)``. Registering a class again replaces its layout. Returns the class.
    """
    axes = (filter_axes,) if isinstance(filter_axes, int) else tuple(filter_axes)
    if not axes or not all(isinstance(a, int) for a in axes):
        raise ValueError(f"filter_axes must be an int or a non-empty sequence of ints, got {filter_axes!r}.")
    if kernel is not None and not isinstance(kernel, str):
        raise TypeError(f"kernel must be the name of the layer's kernel attribute (a str) or None, got {kernel!r}.")
    entry = FilterLayout(kernel, axes, input_axis, bool(dense), bool(depthwise))

    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
            raise TypeError(f"layouts.register needs a Keras layer class, got {cls!r}.")
        _REGISTRY[cls] = entry
        return cls

    return add if layer_class is None else add(layer_class)


def layout(layer):
    """The :class:`FilterLayout` of ``layer``'s class or of its nearest registered base class; None if none."""
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


L = keras.layers
for _cls in (L.Conv1D, L.Conv2D, L.Conv3D):
    register(_cls, input_axis=-2)
for _cls in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register(_cls, filter_axes=-2, input_axis=-1)
for _cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
    register(_cls, filter_axes=(-2, -1), depthwise=True)
for _cls in (L.SeparableConv1D, L.SeparableConv2D):
    register(_cls, kernel="pointwise_kernel")
register(L.Dense, input_axis=-2, dense=True)
for _cls in (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization):
    register(_cls, kernel=None, filter_axes=0)
del L, _cls


def normalize_axes(axes, rank):
    """``axes`` (an int or a sequence of ints, negatives allowed) as a sorted tuple of non-negative axes."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    normalized = tuple(sorted(a % rank for a in axes))
    if any(not -rank <= a < rank for a in axes) or len(set(normalized)) != len(normalized):
        raise ValueError(f"Invalid filter axes {axes} for a tensor of rank {rank}.")
    return normalized


def permutation(rank, axes):
    """The transpose that moves ``axes`` last (in increasing order), the other axes keeping their order."""
    axes = normalize_axes(axes, rank)
    return [i for i in range(rank) if i not in axes] + list(axes)


def filter_shape(shape, axes):
    """Shape that broadcasts a per-filter vector (in :func:`to_rows` order) against ``shape`` along ``axes``."""
    axes = normalize_axes(axes, len(shape))
    return [int(shape[i]) if i in axes else 1 for i in range(len(shape))]


def _count(shape, axes):
    return int(np.prod(filter_shape(shape, axes)))


def to_rows(x, axes):
    """``x`` as one row per filter, ``(num_filters, values_per_filter)``: transpose(reshape(transpose(x, P)))
    with P = :func:`permutation`. NumPy in, NumPy out; otherwise a tensor."""
    if not isinstance(x, np.ndarray):
        x = tf.convert_to_tensor(x)
    shape = tuple(x.shape)
    moved_order = permutation(len(shape), axes)
    filters = _count(shape, axes)
    if isinstance(x, np.ndarray):
        return np.transpose(x, moved_order).reshape(-1, filters).T
    return tf.transpose(tf.reshape(tf.transpose(x, moved_order), [-1, filters]))


def from_rows(rows, shape, axes):
    """Inverse of :func:`to_rows`: the tensor of ``shape`` whose filters along ``axes`` are ``rows``."""
    shape = [int(s) for s in shape]
    moved_order = permutation(len(shape), axes)
    moved_shape = [shape[i] for i in moved_order]
    inverse = np.argsort(moved_order).tolist()
    if isinstance(rows, np.ndarray):
        return np.transpose(rows.T.reshape(moved_shape), inverse)
    return tf.transpose(tf.reshape(tf.transpose(rows), moved_shape), inverse)


def has_kernel(layer):
    """Whether ``layer`` is registered with a kernel (a convolution, Dense or a custom layer that opted in)."""
    entry = layout(layer)
    return entry is not None and not entry.normalization


def is_normalization(layer):
    """Whether ``layer`` is registered as a normalisation layer (per-channel weights, no kernel)."""
    entry = layout(layer)
    return entry is not None and entry.normalization


def primary_kernel(layer):
    """(kernel variable, filter axes) of the kernel that defines ``layer``'s output filters."""
    entry = layout(layer)
    if entry is None or entry.normalization:
        raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) has no registered kernel; register its "
                         "class with keras_graft.layouts.register(...) to give it filters.")
    return getattr(layer, entry.kernel), entry.filter_axes


def num_filters(layer):
    """Number of output filters of a registered layer (channels of a normalisation layer)."""
    entry = layout(layer)
    if entry is not None and entry.normalization:
        return int(layer.weights[0].shape[0])
    kernel, axes = primary_kernel(layer)
    return _count(kernel.shape, axes)


def output_axes(layer, variable):
    """Axes of ``variable`` that index the layer's output filters, or None when it has none.

    The primary kernel's are its filter axes; any 1-D weight (bias, normalisation scale) has one value per filter.
    Other weights (a SeparableConv's depthwise kernel, whose channels are the layer's inputs; any weight of an
    unregistered layer but its 1-D ones) have none.
    """
    if has_kernel(layer) and variable is primary_kernel(layer)[0]:
        return layout(layer).filter_axes
    if len(variable.shape) == 1:
        return (0,)
    return None


def input_axis(layer):
    """Axis of the primary kernel that indexes the layer's input channels, or None if not one-to-one."""
    entry = layout(layer)
    return None if entry is None else entry.input_axis


def filter_layers(model, include_dense=False):
    """Built layers with registered kernels whose filters count as filters (Dense only with ``include_dense``)."""
    return [layer for layer in flatten_layers(model)
            if has_kernel(layer) and layer.built and (include_dense or not layout(layer).dense)]


def flatten_layers(model):
    """All leaf layers of a model, nested models expanded, in the model's order."""
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(flatten_layers(layer))
        else:
            leaves.append(layer)
    return leaves
