"""Information criteria of kernels, filters and layers.

A *filter* is one output unit of a layer: the values that produce one output channel. Keras keeps filters on the
last kernel axis (Conv1D/2D/3D ``(..., in, out)``, Dense ``(in, out)``); Conv2DTranspose keeps them on the axis
before last ``(kh, kw, out, in)``; DepthwiseConv2D ``(kh, kw, in, mult)`` has one filter per ``(in, mult)`` pair.
Every function takes ``filter_axes`` (an int or a tuple of ints) that names those axes;
:func:`keras_graft.layouts.primary_kernel` gives a layer's kernel and filter axes (custom layers opt in through
:func:`keras_graft.layouts.register`).

All computations are vectorised TensorFlow ops: no Python loop over bins or filters, so they run inside a
``tf.function`` and on any device.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_graft import checks
from keras_graft import layouts

__all__ = [
    "Criterion",
    "Entropy",
    "L1Norm",
    "BNScale",
    "Orthogonality",
    "entropy",
    "l1_norm",
    "bn_scale",
    "orthogonality",
    "filter_rows",
    "invalid_filters",
    "InvalidFilterReport",
    "get",
    "serialize",
    "deserialize",
]


def filter_rows(kernel, filter_axes=-1):
    """``kernel`` as a tensor with one row per filter, ``(num_filters, values_per_filter)``: see
    :func:`keras_graft.layouts.to_rows`."""
    return layouts.to_rows(tf.convert_to_tensor(kernel), filter_axes)


def _row_entropy(rows, bins):
    """Entropy of each row's histogram: ``bins`` equal-width bins over the row's [min, max]."""
    rows = tf.cast(rows, tf.float32)
    num_rows = tf.shape(rows)[0]
    low = tf.reduce_min(rows, axis=1, keepdims=True)
    span = tf.reduce_max(rows, axis=1, keepdims=True) - low
    # The maximum lands in the last bin; a constant row (span 0) puts everything in bin 0.
    position = tf.math.divide_no_nan(rows - low, span) * bins
    index = tf.clip_by_value(tf.cast(tf.floor(position), tf.int32), 0, bins - 1)
    index += tf.range(num_rows)[:, None] * bins
    counts = tf.math.unsorted_segment_sum(
        tf.ones_like(tf.reshape(rows, [-1])), tf.reshape(index, [-1]), num_rows * bins
    )
    p = tf.reshape(counts, [num_rows, bins]) / tf.cast(tf.shape(rows)[1], tf.float32)
    safe_p = tf.where(p > 0, p, tf.ones_like(p))
    return -tf.reduce_sum(p * tf.math.log(safe_p), axis=1)


def entropy(kernel, bins=10, per_filter=False, filter_axes=-1):
    """Histogram entropy, H = -sum_k p_k ln p_k over ``bins`` equal-width bins spanning [min, max].

    Meng et al., "Filter Grafting for Deep Neural Networks" (CVPR 2020), Eq. 4. Layer entropy uses every value of
    the kernel; ``per_filter=True`` gives one entropy per filter. Unlike the reference code, whose half-open bins
    drop the maximum value, the maximum belongs to the last bin. A constant tensor has H = 0.
    """
    if int(bins) < 2:
        raise ValueError(f"entropy needs at least 2 bins, got bins={bins}.")
    kernel = tf.convert_to_tensor(kernel)
    if kernel.shape.num_elements() == 0:
        raise ValueError(f"entropy of an empty tensor (shape {tuple(kernel.shape)}): there are no values to bin.")
    if per_filter:
        return _row_entropy(filter_rows(kernel, filter_axes), int(bins))
    return _tensor_entropy(kernel, int(bins))


def _tensor_entropy(values, bins):
    """Entropy of one tensor's histogram; ``histogram_fixed_width`` puts the maximum in the last bin.

    NaN for a tensor holding NaN or Inf.
    """
    values = tf.reshape(tf.cast(values, tf.float32), [-1])
    finite = tf.math.is_finite(tf.reduce_sum(values))
    values = tf.where(finite, values, tf.zeros_like(values))
    low = tf.reduce_min(values)
    high = tf.reduce_max(values)
    high = tf.where(high > low, high, low + 1.0)  # a constant tensor: one full bin, H = 0
    counts = tf.cast(tf.histogram_fixed_width(values, tf.stack([low, high]), nbins=bins), tf.float32)
    p = counts / tf.cast(tf.size(values), tf.float32)
    entropy_value = -tf.reduce_sum(p * tf.math.log(tf.where(p > 0, p, tf.ones_like(p))))
    return tf.where(finite, entropy_value, float("nan"))


def l1_norm(kernel, per_filter=True, filter_axes=-1):
    """L1 norm sum |w|, per filter (default) or over the whole kernel."""
    kernel = tf.cast(tf.convert_to_tensor(kernel), tf.float32)
    if not per_filter:
        return tf.reduce_sum(tf.abs(kernel))
    return tf.reduce_sum(tf.abs(filter_rows(kernel, filter_axes)), axis=1)


def bn_scale(layer_or_gamma):
    """|gamma| per channel of a normalisation layer (or of a gamma tensor): the filter-level criterion."""
    gamma = layer_or_gamma
    if isinstance(layer_or_gamma, keras.layers.Layer):
        gamma = getattr(layer_or_gamma, "gamma", None)
        if gamma is None:
            raise ValueError(
                f"Layer '{layer_or_gamma.name}' has no scale (gamma); bn_scale needs a normalisation layer "
                "built with scale=True."
            )
    return tf.abs(tf.cast(tf.convert_to_tensor(gamma), tf.float32))


def orthogonality(kernel, filter_axes=-1):
    """RePr's per-filter overlap score (Prakash et al., CVPR 2019, Eq. 2-3).

    Rows W_f are the filters, each normalised to unit length; P = |W W^T - I| and the score of filter f is
    sum_j P[f, j] / J over the layer's J filters. A high score means the filter overlaps with others.
    """
    rows = tf.cast(filter_rows(kernel, filter_axes), tf.float32)
    unit = tf.math.l2_normalize(rows, axis=1)
    num_filters = tf.shape(unit)[0]
    overlap = tf.abs(tf.matmul(unit, unit, transpose_b=True) - tf.eye(num_filters))
    return tf.reduce_sum(overlap, axis=1) / tf.cast(num_filters, tf.float32)


class Criterion:
    """How much information a kernel holds; per layer (a scalar) or per filter (a vector).

    Subclasses implement ``__call__(kernel, per_filter=False, filter_axes=-1)``. Criteria are identified by
    strings (``"entropy"``, ``"l1"``, ``"bn_scale"``, ``"orthogonality"``) and serialise with ``get_config``.
    """

    name = None
    #: True when larger values mean more information (RePr's overlap score means less).
    higher_is_better = True
    #: True when the criterion reads a normalisation layer's gamma instead of a kernel.
    reads_gamma = False

    def __call__(self, kernel, per_filter=False, filter_axes=-1):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))


@keras.saving.register_keras_serializable(package="keras_graft")
class Entropy(Criterion):
    """Histogram entropy with ``bins`` equal-width bins (see :func:`entropy`)."""

    name = "entropy"

    def __init__(self, bins=10):
        checks.integer("Entropy", "bins", bins)
        if int(bins) != bins or bins < 2:
            raise ValueError(f"Entropy needs an integer number of bins >= 2, got bins={bins!r}.")
        self.bins = int(bins)

    def __call__(self, kernel, per_filter=False, filter_axes=-1):
        return entropy(kernel, self.bins, per_filter=per_filter, filter_axes=filter_axes)

    def get_config(self):
        return {"bins": self.bins}


@keras.saving.register_keras_serializable(package="keras_graft")
class L1Norm(Criterion):
    """L1 norm: per filter sum |w|; per layer the mean of the filters' L1 norms."""

    name = "l1"

    def __call__(self, kernel, per_filter=False, filter_axes=-1):
        norms = l1_norm(kernel, per_filter=True, filter_axes=filter_axes)
        return norms if per_filter else tf.reduce_mean(norms)


@keras.saving.register_keras_serializable(package="keras_graft")
class BNScale(Criterion):
    """|gamma| of the normalisation layer that follows a filter (filter-level grafting's criterion)."""

    name = "bn_scale"
    reads_gamma = True

    def __call__(self, gamma, per_filter=True, filter_axes=-1):
        scale = bn_scale(gamma)
        return scale if per_filter else tf.reduce_mean(scale)


@keras.saving.register_keras_serializable(package="keras_graft")
class Orthogonality(Criterion):
    """RePr's overlap score per filter (see :func:`orthogonality`); per layer its mean. Lower is better."""

    name = "orthogonality"
    higher_is_better = False

    def __call__(self, kernel, per_filter=True, filter_axes=-1):
        scores = orthogonality(kernel, filter_axes=filter_axes)
        return scores if per_filter else tf.reduce_mean(scores)


_REGISTRY = {
    "entropy": Entropy,
    "l1": L1Norm,
    "l1_norm": L1Norm,
    "bn_scale": BNScale,
    "orthogonality": Orthogonality,
}
_CLASSES = {cls.__name__: cls for cls in (Entropy, L1Norm, BNScale, Orthogonality)}


def serialize(criterion):
    """``{"class_name": ..., "config": ...}`` of a criterion, as ``keras.losses.serialize`` does."""
    return {"class_name": type(criterion).__name__, "config": criterion.get_config()}


def deserialize(config):
    """Inverse of :func:`serialize`."""
    class_name = config.get("class_name")
    if class_name not in _CLASSES:
        raise ValueError(f"Unknown criterion class '{class_name}'. Known: {sorted(_CLASSES)}.")
    return _CLASSES[class_name].from_config(config.get("config", {}))


def get(identifier):
    """A criterion from a string identifier, a config dict, or a :class:`Criterion` (returned as is)."""
    if isinstance(identifier, Criterion):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in _REGISTRY:
            raise ValueError(f"Unknown criterion '{identifier}'. Valid identifiers: {sorted(_REGISTRY)}.")
        return _REGISTRY[key]()
    if isinstance(identifier, dict):
        return deserialize(identifier)
    raise ValueError(f"Could not interpret criterion identifier: {identifier!r}.")


class InvalidFilterReport:
    """Counts of invalid filters (L1 norm below ``threshold``) per layer and in total. Prints as a table."""

    def __init__(self, threshold, per_layer):
        self.threshold = threshold
        #: list of (layer name, invalid filters, total filters)
        self.per_layer = list(per_layer)
        self.invalid = sum(row[1] for row in self.per_layer)
        self.total = sum(row[2] for row in self.per_layer)

    @property
    def ratio(self):
        return self.invalid / self.total if self.total else 0.0

    def to_dict(self):
        return {
            "threshold": self.threshold,
            "invalid": self.invalid,
            "total": self.total,
            "ratio": self.ratio,
            "per_layer": {name: {"invalid": bad, "total": total} for name, bad, total in self.per_layer},
        }

    def __str__(self):
        width = max([len("layer")] + [len(name) for name, _, _ in self.per_layer])
        lines = [f"Invalid filters (L1 norm < {self.threshold:g})", f"{'layer':<{width}}  invalid  total"]
        lines += [f"{name:<{width}}  {bad:>7d}  {total:>5d}" for name, bad, total in self.per_layer]
        lines.append(f"{'total':<{width}}  {self.invalid:>7d}  {self.total:>5d}  ({100 * self.ratio:.2f}%)")
        return "\n".join(lines)

    __repr__ = __str__


def invalid_filters(model, threshold=0.1, include_dense=False):
    """Per-layer and total counts of filters whose L1 norm is below ``threshold``.

    Counts the filters of every layer :func:`keras_graft.layouts.filter_layers` lists: convolutions and
    registered custom layers (and Dense layers with ``include_dense``). The grafting paper
    calls such filters invalid at thresholds 0.1 and 0.01.
    """
    if threshold < 0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}.")
    rows = []
    for layer in layouts.filter_layers(model, include_dense=include_dense):
        kernel, axes = layouts.primary_kernel(layer)
        norms = l1_norm(kernel, per_filter=True, filter_axes=axes).numpy()
        rows.append((layer.name, int(np.sum(norms < threshold)), int(norms.size)))
    return InvalidFilterReport(threshold, rows)
