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

What a round logs (:meth:`GraftResult.logs`, computed in the same ``tf.function`` as the mix):

* ``graft_alpha``: the mean coefficient of the model's own weights over the grafted groups. With two models in a
  ring it says little: alpha_1 = 1 - alpha_0 (arctan is odd), so its mean over the models is 0.5 by construction.
* ``graft_alpha_spread``: the mean of |alpha - 0.5| over the grafted groups (and filters, at filter level): how
  far the coefficients are from a plain average; 0 when the peers hold the same information, up to a / 2.
* ``graft_peer_distance``: ||W_self - W_peer|| / ||W_self|| over the grafted trainable weights (kernels, biases,
  normalisation scales and offsets; not the moving statistics), measured before the round: how far apart the
  peers have drifted since they last met (0 when they are identical).
* ``graft_layers`` and ``graft_skipped_layers``: groups grafted, and groups left alone because the peer's weights
  were not finite.
"""

import math

import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import criteria as criteria_lib
from keras_graft import groups as groups_lib
from keras_graft import layouts

LEVELS = ("layer", "filter")


def adaptive_coefficient(info_self, info_peer, a=0.4, c=500.0):
    """alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)) (the reference code's form)."""
    return 0.5 + (a / math.pi) * tf.atan(c * (info_self - info_peer))


def validate_hyperparameters(a, c, level, owner="Grafting"):
    checks.number(owner, "a", a)
    checks.number(owner, "c", c)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"Grafting coefficient a must lie in [0, 1], got a={a!r}.")
    if c < 0 or not math.isfinite(c):
        raise ValueError(f"Grafting coefficient c must be a finite number >= 0, got c={c!r}.")
    if not isinstance(level, str) or level not in LEVELS:
        raise ValueError(f"Unknown grafting level {level!r}. Valid levels: {list(LEVELS)}.")


#: The keys a round logs, at the values of an epoch without a round (see the module docstring).
IDLE_LOGS = {"graft_alpha": 1.0, "graft_alpha_spread": 0.0, "graft_peer_distance": 0.0, "graft_layers": 0,
             "graft_skipped_layers": 0}
#: Keys averaged (not summed) when several results are merged.
MEAN_KEYS = ("alpha", "alpha_spread", "peer_distance")


def idle_logs(prefix="graft"):
    """The logs of an epoch without a round: the keys of :meth:`GraftResult.logs` at their neutral values."""
    return {key.replace("graft", prefix, 1): value for key, value in IDLE_LOGS.items()}


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


def _trainable_indices(model):
    """Indices in ``model.weights`` of the trainable weights."""
    trainable = {id(w) for w in model.trainable_weights}
    return {i for i, w in enumerate(model.weights) if id(w) in trainable}


class _Mixer:
    """Builds the mixing ops of one (self, peer) pair of weight dicts; runs inside a tf.function."""

    def __init__(self, structure, criterion, a, c, level, trainable=None):
        self.structure = structure
        # Weights the peer distance reads: the grafted trainable ones (all grafted ones if none is trainable).
        grafted = set(structure.grafted_indices)
        self.distance_indices = (grafted & set(trainable or ())) or grafted
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
        target = layouts.filter_shape(shape, axes)
        if int(np.prod(target)) != alpha.shape[0]:
            return tf.reduce_mean(alpha)
        return tf.reshape(alpha, target)

    def mix(self, own, peer, own_info, peer_info, peer_usable=True):
        """New values of the grafted weights of ``own``.

        Returns ({index: value}, mean alpha per group, skipped per group, mean |alpha - 0.5| per group, and
        ||own - peer|| / ||own|| over the distance weights of the groups not skipped).
        """
        alphas, skipped = [], []
        for group, info_self, info_peer in zip(self.structure.groups, own_info, peer_info):
            # A sum is finite only if every value is (overflowing weights count as broken too).
            finite = tf.reduce_all(tf.stack([tf.math.is_finite(tf.reduce_sum(peer[i])) for i, _ in group.members]))
            usable = tf.logical_and(finite, peer_usable)
            alpha = tf.cast(self._alpha(group, info_self, info_peer), tf.float32)
            alphas.append(tf.where(usable, alpha, tf.ones_like(alpha)))
            skipped.append(tf.logical_not(usable))
        values = {}
        difference, norm = tf.zeros([]), tf.zeros([])
        for group, alpha, skip in zip(self.structure.groups, alphas, skipped):
            for index, axes in group.members:
                if index in self.distance_indices:
                    own_value = tf.cast(own[index], tf.float32)
                    gap = tf.reduce_sum(tf.square(own_value - tf.cast(peer[index], tf.float32)))
                    difference += tf.where(skip, 0.0, gap)
                    norm += tf.where(skip, 0.0, tf.reduce_sum(tf.square(own_value)))
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
        spreads = tf.stack([tf.reduce_mean(tf.abs(alpha - 0.5)) for alpha in alphas])
        distance = tf.sqrt(tf.math.divide_no_nan(difference, norm))
        return values, mean_alphas, tf.stack(skipped), spreads, distance


class GraftResult:
    """What one graft did to a model: per group the mean alpha, whether it was skipped (non-finite peer weights)
    and the mean |alpha - 0.5|; and the relative distance to the peer before the round."""

    def __init__(self, group_names, alphas, skipped, spreads=None, peer_distance=0.0):
        self.group_names = list(group_names)
        self.alphas = np.asarray(alphas, dtype=np.float32)
        skipped = np.asarray(skipped, dtype=bool).reshape(-1)
        self.skipped = [name for name, bad in zip(self.group_names, skipped) if bad]
        self._used = ~skipped if skipped.size else np.ones(len(self.group_names), bool)
        self.spreads = (np.abs(self.alphas - 0.5) if spreads is None else np.asarray(spreads, dtype=np.float32))
        self.peer_distance = float(peer_distance)

    @property
    def mean_alpha(self):
        """Mean coefficient of the model's own weights over the grafted groups (1 when none was grafted)."""
        used = self.alphas[self._used]
        return float(np.mean(used)) if used.size else 1.0

    @property
    def alpha_spread(self):
        """Mean |alpha - 0.5| over the grafted groups (0 when none was grafted)."""
        used = self.spreads[self._used]
        return float(np.mean(used)) if used.size else 0.0

    def logs(self, prefix="graft"):
        """Scalars for Keras ``logs``: History, CSVLogger and TensorBoard record them (see the module docstring)."""
        return {
            f"{prefix}_alpha": self.mean_alpha,
            f"{prefix}_alpha_spread": self.alpha_spread,
            f"{prefix}_peer_distance": self.peer_distance,
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
        validate_hyperparameters(a, c, level, "Grafter")
        self.model = model
        self.criterion = criteria_lib.get(criterion or default_criterion(level))
        self.structure = groups_lib.graft_structure(model, layers)
        self._mixer = _Mixer(self.structure, self.criterion, float(a), float(c), level, _trainable_indices(model))
        self._array_function = tf.function(self._graft_flat, autograph=False)
        self._model_functions = {}

    @property
    def group_names(self):
        return [g.name for g in self.structure.groups]

    def _graft(self, peer_values, peer_usable):
        weights = self.model.weights
        own = {i: weights[i].value for i in self.structure.grafted_indices}
        peer = dict(zip(self.structure.grafted_indices, peer_values))
        values, alphas, skipped, spreads, distance = self._mixer.mix(
            own, peer, self._mixer.information(own), self._mixer.information(peer), peer_usable
        )
        for index, value in values.items():
            weights[index].assign(value)
        return alphas, skipped, spreads, distance

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
        return self._result(self._model_functions[key](), f"peer '{peer.name}'")

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
        outputs = self._array_function(flat, tf.constant(bool(peer_usable)))
        return self._result(outputs, peer_label, warn=bool(peer_usable))

    def _result(self, outputs, peer_label, warn=True):
        alphas, skipped, spreads, distance = (t.numpy() for t in outputs)
        result = GraftResult(self.group_names, alphas, skipped, spreads, distance)
        if warn:
            result.warn_skipped(f"{self.model.name} <- {peer_label}")
        return result


class RingGrafter:
    """Grafts N models in a ring in one tf.function: model k takes from model k-1 (mod N).

    Every model reads its predecessor's weights as they were before the round. A model flagged unhealthy (e.g. its
    loss became NaN) is never mixed into its successor.
    """

    def __init__(self, models, criterion=None, a=0.4, c=500.0, level="layer", layers=None):
        validate_hyperparameters(a, c, level, "RingGrafter")
        if len(models) < 2:
            raise ValueError(f"A grafting ring needs at least 2 models, got {len(models)}.")
        for k, peer in enumerate(models[1:], start=1):
            check_compatible(models[0], weight_specs(peer), f"Model {k} ('{peer.name}')")
        self.models = list(models)
        self.criterion = criteria_lib.get(criterion or default_criterion(level))
        self.structure = groups_lib.graft_structure(models[0], layers)
        self._mixer = _Mixer(self.structure, self.criterion, float(a), float(c), level,
                             _trainable_indices(models[0]))
        self._function = tf.function(self._graft, autograph=False)

    @property
    def group_names(self):
        return [g.name for g in self.structure.groups]

    def _graft(self, healthy):
        indices = self.structure.grafted_indices
        before = [{i: tf.identity(m.weights[i].value) for i in indices} for m in self.models]
        infos = [self._mixer.information(weights) for weights in before]  # once per model, not per pair
        updates, outputs = [], []
        for k in range(len(self.models)):
            previous = (k - 1) % len(self.models)
            values, *measures = self._mixer.mix(before[k], before[previous], infos[k], infos[previous],
                                                healthy[previous])
            updates.append(values)
            outputs.append(measures)
        for model, values in zip(self.models, updates):
            for index, value in values.items():
                model.weights[index].assign(value)
        return tuple(tf.stack(column) for column in zip(*outputs))  # alphas, skipped, spreads, distances

    def __call__(self, healthy=None):
        """Runs one round; returns one :class:`GraftResult` per model."""
        healthy = [True] * len(self.models) if healthy is None else [bool(h) for h in healthy]
        columns = [t.numpy() for t in self._function(tf.constant(healthy))]
        results = [GraftResult(self.group_names, *per_model) for per_model in zip(*columns)]
        for k, result in enumerate(results):
            result.warn_skipped(f"model {k} <- model {(k - 1) % len(self.models)}")
        return results


def graft(model, peer, criterion=None, a=0.4, c=500.0, level="layer", layers=None):
    """Grafts ``peer`` (a Keras model of the same architecture) into ``model`` once; returns a GraftResult."""
    return Grafter(model, criterion, a, c, level, layers).graft_model(peer)
