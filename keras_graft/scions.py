"""Scions from inside the network: the grafting paper's alternatives to grafting another network's weights.

Meng et al., "Filter Grafting for Deep Neural Networks" (CVPR 2020), Sec. 3, "Information source", asks where the
information grafted into invalid filters (L1 norm below a threshold) should come from, and compares on MobileNetV2
(CIFAR-10 / CIFAR-100 top-1): baseline 92.42 / 71.44, Gaussian noise 92.51 / 72.34, internal filters
92.68 / 72.38, external grafting (another network) 92.94 / 72.90. This module supplies the first two sources:

* :class:`NoiseScion`: ``W_f <- W_f + N(0, sigma_t^2)`` for every invalid filter f, ``sigma_t = sigma_0 * a^t``.
* :class:`InternalScion`: ``W_f <- W_f + W_g`` where f is the layer's i-th smallest filter by L1 norm and g its
  i-th largest.

Both are :class:`keras_graft.peers.PeerSource` objects, so ``Grafting(peers=NoiseScion())`` runs them at the end of
an epoch in ``model.fit``, and ``GraftTrainer(grafting=Grafting(NoiseScion()))`` (or a PeerEnsemble fit with that
callback) grafts each of its models from its own copy (``for_member(k)``: noise seeded by the model index too);
``scion.apply(model, round_index)`` runs them from a custom loop. Each call is one compiled ``tf.function`` over all convolution layers: the kernels are read, changed and
assigned in-graph. Called outside ``strategy.run`` (cross-replica context), the assignment writes the same value to
every replica of a MirroredVariable, and the noise comes from stateless random ops seeded by ``(seed, round)``, so
replicas stay equal and a round is reproducible.
"""

import abc
import copy
import random

import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import criteria
from keras_graft import grafting
from keras_graft import layouts
from keras_graft import peers


class ScionResult(grafting.GraftResult):
    """What one scion round did to a model: invalid and grafted filters per convolution layer.

    A scion adds to the model's weights without scaling them (W <- 1 * W + scion), so the coefficient of the
    model's own weights (``graft_alpha``) is 1 in every round, not a measured mix; with no peer, ``graft_alpha_spread`` and ``graft_peer_distance`` are 0;
    ``graft_layers`` counts the layers with at least one grafted filter and ``graft_skipped_layers`` is 0.
    ``logs()`` adds ``scion_filters``, the number of filters grafted.
    """

    def __init__(self, layer_names, invalid, grafted):
        self.layer_names = list(layer_names)
        self.invalid_per_layer = np.asarray(invalid, dtype=np.int64)
        self.grafted_per_layer = np.asarray(grafted, dtype=np.int64)
        touched = [name for name, count in zip(self.layer_names, self.grafted_per_layer) if count]
        # No peer: spread and peer distance stay at their neutral 0.
        super().__init__(touched, np.ones(len(touched)), np.zeros(len(touched), dtype=bool),
                         spreads=np.zeros(len(touched)), peer_distance=0.0)

    @property
    def invalid(self):
        """Filters whose L1 norm was below the threshold before the round."""
        return int(self.invalid_per_layer.sum())

    @property
    def filters(self):
        """Filters that received a scion this round."""
        return int(self.grafted_per_layer.sum())

    def logs(self, prefix="graft"):
        logs = super().logs(prefix)
        logs["scion_filters"] = self.filters
        return logs


class Scion(peers.PeerSource):
    """A source of weights for a model's invalid filters (L1 norm below ``threshold``) taken from the model itself.

    Subclasses define :meth:`_scion`, the per-layer addition. ``apply(model, round_index)`` runs one round on
    ``model`` in one compiled function and returns a :class:`ScionResult`; inside ``model.fit`` the
    :class:`keras_graft.Grafting` callback calls it through :meth:`graft_round` with the epoch as the round.
    :attr:`member` is the model index of a copy made by :meth:`for_member` (None otherwise).
    """

    per_member = True

    def __init__(self, threshold=0.1):
        self.threshold = checks.number(type(self).__name__, "threshold", threshold, minimum=0)
        self.member = None
        self._functions = {}

    @abc.abstractmethod
    def _scion(self, columns, norms, invalid, layer_index, round_index, state):
        """(additions, grafted) for one layer: ``columns`` is its kernel as ``(values, filters)``, ``norms`` the
        filters' L1 norms and ``invalid`` those below the threshold; ``grafted`` marks the filters that take
        ``additions`` (same shape as ``columns``). ``state``: what :meth:`track` returned for the model."""

    def for_member(self, index):
        """A copy for model ``index`` of N models trained together, with the same settings (and drawn seed)."""
        member = copy.copy(self)
        member.member = int(index)
        member._functions = {}
        return member

    def get_config(self):
        return {"threshold": self.threshold}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def setup(self, model):
        if not model.built or not layouts.filter_layers(model):
            raise ValueError(f"{type(self).__name__} needs a built model with convolution layers; model "
                             f"'{model.name}' has none.")

    def graft_round(self, grafter, round_index):
        return [self.apply(grafter.model, round_index)]

    def idle_logs(self):
        return {**super().idle_logs(), "scion_filters": 0}

    def apply(self, model, round_index):
        """Grafts round ``round_index`` (the epoch, 0-based) into ``model``'s invalid filters; a ScionResult.

        Call it outside ``strategy.run`` under a distribution strategy so that every replica gets the same values.
        """
        if int(round_index) != round_index or round_index < 0:
            raise ValueError(f"round_index must be an integer >= 0, got {round_index!r}.")
        entry = self._functions.get(id(model))
        if entry is None or entry[0] is not model:
            self.setup(model)
            layers = layouts.filter_layers(model)
            entry = (model, layers, tf.function(self._round_function(layers, self.track(model)), autograph=False))
            self._functions[id(model)] = entry
        _, layers, function = entry
        invalid, grafted = function(tf.constant(int(round_index), tf.int64))
        result = ScionResult([layer.name for layer in layers], invalid.numpy(), grafted.numpy())
        self._log(model, result)
        return result

    def _round_function(self, layers, state):
        """The graft of one round over ``layers``' kernels, to be compiled: round index -> (invalid, grafted)."""
        kernels = [layouts.primary_kernel(layer) for layer in layers]

        def graft(round_index):
            invalid_counts, grafted_counts = [], []
            for layer_index, (kernel, axes) in enumerate(kernels):
                value = kernel.value
                columns = tf.transpose(layouts.to_rows(tf.cast(value, tf.float32), axes))  # (values, filters)
                norms = criteria.l1_norm(columns, filter_axes=-1)
                invalid = norms < self.threshold
                additions, grafted = self._scion(columns, norms, invalid, layer_index, round_index, state)
                # Select rather than add zeros, so that valid filters keep their exact bits.
                new_columns = tf.where(grafted[None, :], columns + additions, columns)
                kernel.assign(tf.cast(layouts.from_rows(tf.transpose(new_columns), value.shape, axes), value.dtype))
                invalid_counts.append(tf.reduce_sum(tf.cast(invalid, tf.int64)))
                grafted_counts.append(tf.reduce_sum(tf.cast(grafted, tf.int64)))
            return tf.stack(invalid_counts), tf.stack(grafted_counts)

        return graft

    def _log(self, model, result):
        if result.invalid == 0:
            logging.info("%s: no filter of model '%s' has an L1 norm below %g; nothing to graft this round.",
                         type(self).__name__, model.name, self.threshold)
        elif result.filters < result.invalid:
            logging.info("%s: grafted %d of the %d invalid filters of model '%s' (L1 norm < %g).",
                         type(self).__name__, result.filters, result.invalid, model.name, self.threshold)


class NoiseScion(Scion):
    """Grafts Gaussian noise into invalid filters, with a standard deviation that decays every round.

    Meng et al., CVPR 2020, Sec. 3 ("Information source"): each value of an invalid filter f (L1 norm below
    ``threshold``) becomes

        W_f <- W_f + eps,  eps ~ N(0, sigma_t^2),  sigma_t = initial_sigma * sigma_decay^t,

    with t the round (the 0-based epoch under :class:`keras_graft.Grafting`) and 0 < sigma_decay < 1. Valid filters
    are unchanged. The default ``sigma_decay=0.9`` makes sigma_t fall below 0.1, the scale of a He-initialised
    3x3 convolution weight, after about 22 epochs and below 0.01 after about 44: the noise re-activates filters
    early and is negligible before the first learning-rate drop (epoch 60) of the papers' 200-epoch CIFAR schedule.

    The noise is drawn by stateless random ops from ``(seed, round, layer position)``, and the model index of a
    :meth:`for_member` copy: a round is reproducible, every replica of a distributed model gets the same noise and
    the models of a GraftTrainer get independent noise. ``seed=None`` draws a seed once, at construction (with
    SystemRandom). The seed in use is a variable attached to the grafted model (:meth:`track`), so
    ``save_weights``, ``BackupAndRestore`` and GraftTrainer's ``backup_dir`` carry it and a resumed run draws the
    same noise.
    """

    STATE_ATTRIBUTE = "_keras_graft_noise_scion_state"

    def __init__(self, threshold=0.1, sigma_decay=0.9, initial_sigma=1.0, seed=None):
        super().__init__(threshold)
        self.sigma_decay = checks.number("NoiseScion", "sigma_decay", sigma_decay, minimum=0, maximum=1,
                                         open_minimum=True, open_maximum=True)
        self.initial_sigma = checks.number("NoiseScion", "initial_sigma", initial_sigma, minimum=0,
                                           open_minimum=True)
        self.seed = checks.integer("NoiseScion", "seed", seed, allow_none=True)
        self._seed = self.seed if seed is not None else random.SystemRandom().randrange(2**31)
        self._states = {}

    def sigma(self, round_index):
        """sigma_t = initial_sigma * sigma_decay^t."""
        return self.initial_sigma * self.sigma_decay**round_index

    def get_config(self):
        config = super().get_config()
        config.update(sigma_decay=self.sigma_decay, initial_sigma=self.initial_sigma, seed=self.seed)
        return config

    def for_member(self, index):
        member = super().for_member(index)
        member._states = {}
        return member

    def track(self, model):
        """The model's state (the variable ``seed``): attached on the first call for ``model``, then reused."""
        entry = self._states.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, peers.attach_state(model, self.STATE_ATTRIBUTE, {"seed": self._seed}))
            self._states[id(model)] = entry
        return entry[1]

    def _scion(self, columns, norms, invalid, layer_index, round_index, state):
        sigma = self.initial_sigma * tf.pow(self.sigma_decay, tf.cast(round_index, tf.float32))
        key = tf.stack([state.seed.value, round_index])
        if self.member is not None:
            key = tf.random.experimental.stateless_fold_in(key, self.member)
        seed = tf.random.experimental.stateless_fold_in(key, layer_index)
        noise = tf.random.stateless_normal(tf.shape(columns), seed=seed, stddev=sigma, dtype=columns.dtype)
        return noise, invalid


class InternalScion(Scion):
    """Grafts each invalid filter with the rank-matched large filter of the same layer.

    Meng et al., CVPR 2020, Sec. 3 ("Information source"), internal filters: rank a layer's J filters by L1 norm;
    the i-th smallest filter s_i, when invalid (L1 norm below ``threshold``), takes the weights of the i-th largest
    filter l_i:

        W_{s_i} <- W_{s_i} + W_{l_i},   i = 1 .. J,

    every filter reading the values from before the round. Valid filters are unchanged. When more than half of a
    layer's filters are invalid, some invalid filters are matched with invalid ones (or, for the middle rank,
    with themselves); those carry no information to graft and stay unchanged. Ties in the L1 norm keep the
    filters' order.
    """

    def _scion(self, columns, norms, invalid, layer_index, round_index, state):
        order = tf.argsort(norms, stable=True)
        rank = tf.math.invert_permutation(order)
        partner = tf.gather(order, tf.size(order) - 1 - rank)
        grafted = tf.logical_and(invalid, tf.logical_not(tf.gather(invalid, partner)))
        return tf.gather(columns, partner, axis=1), grafted
