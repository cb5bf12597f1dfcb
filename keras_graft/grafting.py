"""The graft: mix a model's weights with a peer's, weighted by how much information each layer holds.

Meng et al., "Filter Grafting for Deep Neural Networks" (CVPR 2020). For each weight group (a kernel layer with its
bias and normalisation layer, see :mod:`keras_graft.groups`):

    W_self <- alpha * W_self + (1 - alpha) * W_peer,
    alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)),

with I the group's information (entropy of its kernel by default). The paper prints a * arctan(...) without 1/pi;
the authors' code divides by pi, so alpha stays in (0.5 - a/2, 0.5 + a/2), and so do we. The code rounds alpha to
two decimals; we do not.

At filter level (the reference's VGG experiment) each output filter j has its own coefficient. With the BN-scale
criterion it is alpha_j = |g_self_j| / (|g_self_j| + |g_peer_j|) from the normalisation layer's scales; other
per-filter criteria use the arctan formula per filter. Coefficient j mixes the BN channel j, the kernel's output
filter j and the next layer's input channel j; a kernel weight therefore gets alpha_out[j] * alpha_in[i], which is
what the reference's two successive in-place mixes amount to.

Every graft runs as one ``tf.function`` over all weights, in cross-replica context when a strategy is active, so
every replica receives the same mixed value.
"""

import math

import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import criteria as criteria_lib
from keras_graft import groups as groups_lib

LEVELS = ("layer", "filter")


def adaptive_coefficient(info_self, info_peer, a=0.4, c=500.0):
    """alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)) (the reference code's form)."""
    return 0.5 + (a / math.pi) * tf.atan(c * (info_self - info_peer))


def validate_hyperparameters(a, c, level):
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"Grafting coefficient a must lie in [0, 1], got a={a}.")
    if c < 0 or not math.isfinite(c):
        raise ValueError(f"Grafting coefficient c must be a finite number >= 0, got c={c}.")
    if level not in LEVELS:
        raise ValueError(f"Unknown grafting level '{level}'. Valid levels: {list(LEVELS)}.")


def default_criterion(level):
    """Entropy at layer level (the CIFAR experiments), BN scale at filter level (the VGG experiment)."""
    return "entropy" if level == "layer" else "bn_scale"


def weight_specs(model):
    """[(path, shape)] of a model's weights, the form architectures are compared in."""
    return [(w.path, tuple(w.shape)) for w in model.weights]


def check_compatible(model, peer_specs, peer_label):
    """Raises a ValueError naming the first weight whose shape differs between ``model`` and a peer."""
    own = weight_specs(model)
    for (path, shape), (peer_path, peer_shape) in zip(own, peer_specs):
        if tuple(shape) != tuple(peer_shape):
            raise ValueError(
                f"{peer_label} does not match model '{model.name}': weight '{path}' has shape {tuple(shape)} "
                f"in the model but '{peer_path}' has shape {tuple(peer_shape)} in the peer. Grafting needs peers "
                "of the same architecture."
            )
    if len(own) != len(peer_specs):
        first_extra = own[len(peer_specs)][0] if len(own) > len(peer_specs) else peer_specs[len(own)][0]
        raise ValueError(
            f"{peer_label} does not match model '{model.name}': the model has {len(own)} weights and the peer "
            f"{len(peer_specs)} (first unmatched: '{first_extra}'). Grafting needs peers of the same architecture."
        )


class _Mixer:
    """Builds the mixing ops of one (self, peer) pair of weight dicts; runs inside a tf.function."""

    def __init__(self, structure, criterion, a, c, level):
        self.structure = structure
        self.criterion = criterion
        self.fallback = criteria_lib.Entropy()
        self.a = a
        self.c = c
        self.level = level

    def _uses_ratio(self, group):
        return self.level == "filter" and self.criterion.reads_gamma and group.gamma_index is not None

    def information(self, weights):
        """Per group: |gamma| (BN-scale ratio) or the criterion's value, scalar or per filter. One model's."""
        infos = []
        for group in self.structure.groups:
            if self._uses_ratio(group):
                infos.append(tf.abs(tf.cast(weights[group.gamma_index], tf.float32)))
            elif self.criterion.reads_gamma and group.gamma_index is not None:
                infos.append(self.criterion(weights[group.gamma_index], per_filter=False))
            else:
                criterion = self.fallback if self.criterion.reads_gamma else self.criterion
                per_filter = self.level == "filter" and not self.criterion.reads_gamma
                info = criterion(weights[group.info_index], per_filter=per_filter, filter_axes=group.info_axes)
                infos.append(info if criterion.higher_is_better else -info)
        return infos

    def _alpha(self, group, info_self, info_peer):
        """Scalar (layer level) or per-filter vector (filter level) coefficient of one group."""
        if self._uses_ratio(group):
            total = info_self + info_peer
            return tf.where(total > 0, tf.math.divide_no_nan(info_self, total), 0.5 * tf.ones_like(total))
        return adaptive_coefficient(info_self, info_peer, self.a, self.c)

    @staticmethod
    def _shaped(alpha, shape, axes):
        """``alpha`` broadcastable against a weight of ``shape`` along ``axes`` (mean alpha if it cannot be)."""
        if alpha.shape.rank == 0 or axes is None:
            return tf.reduce_mean(alpha)
        rank = len(shape)
        axes = [a % rank for a in axes]
        if int(np.prod([shape[a] for a in axes])) != alpha.shape[0]:
            return tf.reduce_mean(alpha)
        target = [shape[i] if i in axes else 1 for i in range(rank)]
        return tf.reshape(alpha, target)

    def mix(self, own, peer, own_info, peer_info, peer_usable=True):
        """New values of the grafted weights of ``own``; returns ({index: value}, mean alphas, skipped)."""
        alphas, skipped = [], []
        for group, info_self, info_peer in zip(self.structure.groups, own_info, peer_info):
            # A sum is finite only if every value is (overflowing weights count as broken too).
            finite = tf.reduce_all(tf.stack([tf.math.is_finite(tf.reduce_sum(peer[i])) for i, _ in group.members]))
            usable = tf.logical_and(finite, peer_usable)
            alpha = tf.cast(self._alpha(group, info_self, info_peer), tf.float32)
            alphas.append(tf.where(usable, alpha, tf.ones_like(alpha)))
            skipped.append(tf.logical_not(usable))
        values = {}
        for group, alpha, skip in zip(self.structure.groups, alphas, skipped):
            for index, axes in group.members:
                shape = own[index].shape
                coefficient = self._shaped(alpha, shape, axes)
                link = self.structure.input_links.get(index)
                if self.level == "filter" and link is not None:
                    source, axis = link
                    coefficient = coefficient * self._shaped(alphas[source], shape, (axis,))
                own_value = tf.cast(own[index], tf.float32)
                peer_value = tf.cast(peer[index], tf.float32)
                mixed = peer_value + coefficient * (own_value - peer_value)
                # Select rather than multiply by zero: 0 * NaN would still be NaN.
                values[index] = tf.cast(tf.where(skip, own_value, mixed), own[index].dtype)
        mean_alphas = tf.stack([tf.reduce_mean(alpha) for alpha in alphas])
        return values, mean_alphas, tf.stack(skipped)


class GraftResult:
    """What one graft did: mean alpha per group, the groups skipped for non-finite peer weights."""

    def __init__(self, group_names, alphas, skipped):
        self.group_names = list(group_names)
        self.alphas = np.asarray(alphas, dtype=np.float32)
        self.skipped = [name for name, bad in zip(self.group_names, np.asarray(skipped)) if bad]

    @property
    def mean_alpha(self):
        used = [a for name, a in zip(self.group_names, self.alphas) if name not in self.skipped]
        return float(np.mean(used)) if used else 1.0

    def logs(self, prefix="graft"):
        """Scalars for Keras ``logs``: History, CSVLogger and TensorBoard record them."""
        return {
            f"{prefix}_alpha": self.mean_alpha,
            f"{prefix}_layers": len(self.group_names) - len(self.skipped),
            f"{prefix}_skipped_layers": len(self.skipped),
        }

    def warn_skipped(self, label):
        for name in self.skipped:
            logging.warning("Grafting %s: peer weights of layer '%s' are not finite (NaN or Inf); the layer "
                            "keeps its own weights this round.", label, name)


class Grafter:
    """One compiled graft of ``model``'s weights with a peer's weights (a list aligned with ``model.weights``).

    Args:
      model: a built Keras model; it is changed in place.
      criterion: a criterion identifier or object; None picks entropy (layer) or BN scale (filter).
      a, c: the adaptive coefficient's constants.
      level: "layer" or "filter".
      layers: restricts grafting to these layer names (or to layers where this callable is true).
    """

    def __init__(self, model, criterion=None, a=0.4, c=500.0, level="layer", layers=None):
        validate_hyperparameters(a, c, level)
        self.model = model
        self.criterion = criteria_lib.get(criterion or default_criterion(level))
        self.structure = groups_lib.graft_structure(model, layers)
        self._mixer = _Mixer(self.structure, self.criterion, float(a), float(c), level)
        self._array_function = tf.function(self._graft_flat, autograph=False)
        self._model_functions = {}

    @property
    def group_names(self):
        return [g.name for g in self.structure.groups]

    def _graft(self, peer_values, peer_usable):
        weights = self.model.weights
        own = {i: weights[i].value for i in self.structure.grafted_indices}
        peer = dict(zip(self.structure.grafted_indices, peer_values))
        values, alphas, skipped = self._mixer.mix(
            own, peer, self._mixer.information(own), self._mixer.information(peer), peer_usable
        )
        for index, value in values.items():
            weights[index].assign(value)
        return alphas, skipped

    def _graft_flat(self, flat_peer, peer_usable):
        """Grafts peer weights passed as one flat float32 vector: one host-to-device copy, not one per array."""
        weights = self.model.weights
        indices = self.structure.grafted_indices
        sizes = [int(np.prod(weights[i].shape)) for i in indices]
        parts = tf.split(flat_peer, sizes)
        return self._graft([tf.reshape(part, weights[i].shape) for i, part in zip(indices, parts)], peer_usable)

    def graft_model(self, peer):
        """Grafts a peer Keras model's current weights, read in-graph (no host round trip)."""
        key = id(peer)
        if key not in self._model_functions:
            check_compatible(self.model, weight_specs(peer), f"Peer '{peer.name}'")
            indices = self.structure.grafted_indices
            self._model_functions[key] = tf.function(
                lambda: self._graft([peer.weights[i].value for i in indices], tf.constant(True)), autograph=False
            )
        alphas, skipped = self._model_functions[key]()
        return self._result(alphas, skipped, f"peer '{peer.name}'")

    def graft_arrays(self, peer_weights, peer_label="peer", peer_usable=True):
        """Grafts weights given as arrays or tensors in ``model.weights`` order (e.g. loaded from a file).

        ``peer_usable=False`` (an unhealthy peer) keeps the model's own weights: every group counts as skipped.
        """
        peer_weights = list(peer_weights)
        if len(peer_weights) != len(self.model.weights):
            raise ValueError(f"{peer_label} has {len(peer_weights)} weights, model '{self.model.name}' has "
                             f"{len(self.model.weights)}.")
        flat = np.concatenate([np.asarray(peer_weights[i], np.float32).ravel()
                               for i in self.structure.grafted_indices])
        alphas, skipped = self._array_function(flat, tf.constant(bool(peer_usable)))
        return self._result(alphas, skipped, peer_label, warn=bool(peer_usable))

    def _result(self, alphas, skipped, peer_label, warn=True):
        result = GraftResult(self.group_names, alphas.numpy(), skipped.numpy())
        if warn:
            result.warn_skipped(f"{self.model.name} <- {peer_label}")
        return result


class RingGrafter:
    """Grafts N models in a ring in one tf.function: model k takes from model k-1 (mod N).

    Every model reads its predecessor's weights as they were before the round. A model flagged unhealthy (e.g. its
    loss became NaN) is never mixed into its successor.
    """

    def __init__(self, models, criterion=None, a=0.4, c=500.0, level="layer", layers=None):
        validate_hyperparameters(a, c, level)
        if len(models) < 2:
            raise ValueError(f"A grafting ring needs at least 2 models, got {len(models)}.")
        for k, peer in enumerate(models[1:], start=1):
            check_compatible(models[0], weight_specs(peer), f"Model {k} ('{peer.name}')")
        self.models = list(models)
        self.criterion = criteria_lib.get(criterion or default_criterion(level))
        self.structure = groups_lib.graft_structure(models[0], layers)
        self._mixer = _Mixer(self.structure, self.criterion, float(a), float(c), level)
        self._function = tf.function(self._graft, autograph=False)

    @property
    def group_names(self):
        return [g.name for g in self.structure.groups]

    def _graft(self, healthy):
        indices = self.structure.grafted_indices
        before = [{i: tf.identity(m.weights[i].value) for i in indices} for m in self.models]
        infos = [self._mixer.information(weights) for weights in before]  # once per model, not per pair
        updates, alphas, skipped = [], [], []
        for k in range(len(self.models)):
            previous = (k - 1) % len(self.models)
            values, alpha, skip = self._mixer.mix(before[k], before[previous], infos[k], infos[previous],
                                                  healthy[previous])
            updates.append(values)
            alphas.append(alpha)
            skipped.append(skip)
        for model, values in zip(self.models, updates):
            for index, value in values.items():
                model.weights[index].assign(value)
        return tf.stack(alphas), tf.stack(skipped)

    def __call__(self, healthy=None):
        """Runs one round; returns one :class:`GraftResult` per model."""
        healthy = [True] * len(self.models) if healthy is None else [bool(h) for h in healthy]
        alphas, skipped = self._function(tf.constant(healthy))
        results = [GraftResult(self.group_names, a, s) for a, s in zip(alphas.numpy(), skipped.numpy())]
        for k, result in enumerate(results):
            result.warn_skipped(f"model {k} <- model {(k - 1) % len(self.models)}")
        return results


def graft(model, peer, criterion=None, a=0.4, c=500.0, level="layer", layers=None):
    """Grafts ``peer`` (a Keras model of the same architecture) into ``model`` once; returns a GraftResult."""
    return Grafter(model, criterion, a, c, level, layers).graft_model(peer)
