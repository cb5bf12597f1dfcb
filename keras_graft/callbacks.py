"""Keras callbacks: Grafting for ``model.fit``, and FilterStats to log invalid filters and entropy."""

import math

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import config as config_lib
from keras_graft import criteria as criteria_lib
from keras_graft import keras_internals
from keras_graft import layouts
from keras_graft import peers as peers_lib
from keras_graft import rounds as rounds_lib
from keras_graft.ensemble import PeerEnsemble


class Grafting(keras.callbacks.Callback):
    """Grafts peers' weights into the model after every ``every_n_epochs``-th epoch.

    Who trains the peers, in each usage:

    - ``PeerEnsemble.fit(..., callbacks=[Grafting()])``: the ensemble's own train step trains every peer, and the
      peers graft in a ring (peer k takes from peer k - 1, reading the weights from before the round). Peers whose
      epoch loss (``loss_k``) is NaN or Inf are not mixed into their successor (``nonfinite_models`` counts them).
    - ``GraftTrainer(grafting=Grafting(...))``: the trainer trains its models and grafts them in a ring (or, with
      a scion, ``Grafting(NoiseScion())``, each model from its own copy); it reads only this callback's settings.
    - ``model.fit(..., callbacks=[Grafting(SharedDirectory(...))])``: one process per peer, each training its own
      model with ``fit``; they meet through the directory.
    - ``model.fit(..., callbacks=[Grafting(peers=[donor])])``: nobody trains ``donor`` here. Grafting from a fixed
      (pre-trained) donor is legitimate, but a peer that was meant to train alongside and does not drags the model
      towards the same untrained weights every round: when a peer's weights have not changed since the previous
      round (one in-graph checksum per peer) a warning names it; ``warn_static=False`` silences it. For peers that
      train together, fit a PeerEnsemble.

    ``peers`` is a Keras model, a list of models (grafted one after another), a
    :class:`keras_graft.peers.PeerSource` (:class:`keras_graft.SharedDirectory`, the scions), or None for the
    ring of a PeerEnsemble or GraftTrainer.

    When the graft happens (the reference protocol, fxmeng/filter-grafting: train -> test -> save -> graft): the
    round after epoch e runs when epoch e + 1 begins, so epoch e's validation, ``ModelCheckpoint``,
    ``EarlyStopping(restore_best_weights=True)`` and ``BackupAndRestore`` all see the weights *before* the graft,
    and a resumed run grafts exactly once. No round follows the final epoch (or an early stop) unless
    ``final_graft=True``: the weights ``fit`` returns are the ones last validated.

    A peer source that keeps the run's state (:class:`keras_graft.SharedDirectory`) restores a killed process when
    training begins: ``fit`` then starts after the last epoch the process completed and the pending round runs once.

    Adds to ``logs`` every epoch, describing the round that opened it (the neutral values in brackets when none
    did, so CSVLogger sees the same columns every epoch); put it before CSVLogger or TensorBoard in the callback
    list so they record these values:

    * ``graft_alpha`` (1): the mean coefficient alpha of this model's own weights over the grafted layers. When
      the peer grafts this model back (a 2-model ring), the peer's alpha is 1 - alpha, so averaged over both
      models it is 0.5 by construction: compare models through the keys below.
    * ``graft_alpha_spread`` (0): the mean |alpha - 0.5| over the grafted layers: how unequal the mix was; 0 is a
      plain average, the maximum is a / 2.
    * ``graft_peer_distance`` (0): ||W - W_peer|| / ||W|| over the grafted trainable weights, before the round:
      how far the peers drifted apart since they last met (0: identical).
    * ``graft_layers`` (0) and ``graft_skipped_layers`` (0): layers grafted, and layers left alone because the
      peer's weights were not finite.

    With several peers (grafted one after another) the alphas, spreads and distances are averaged over the peers
    and the layer counts summed. Scions (:class:`keras_graft.NoiseScion`) have no peer and add to the weights
    without scaling them: alpha 1 (not a measured mix), spread and distance 0, plus ``scion_filters``.

    On a PeerEnsemble (``peers=None``) the same keys come per peer (``graft_alpha_k``...), merged over the peers
    without the suffix, with ``nonfinite_models``. A scion on a PeerEnsemble grafts each peer from its own copy
    (``scion.for_member(k)``), with the same keys per peer.

    The settings (criterion to final_graft) are held in :attr:`config`, a :class:`keras_graft.GraftConfig`:
    pass them as arguments or as ``config=GraftConfig(...)``.

    Args:
      peers: see above.
      criterion: "entropy", "l1", "bn_scale", a criterion object; None: entropy (layer), BN scale (filter).
      a, c: alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)); a in [0, 1], c >= 0.
      level: "layer" or "filter".
      every_n_epochs: graft after epochs n, 2n, ... (1-based).
      layers: only graft these layer names (or the layers where this callable is true).
      final_graft: also graft after the final epoch (the weights returned are then grafted, not validated).
      model: the model to graft, when it is not the one being fit: e.g. ``distiller.student`` when fitting a
        ``keras.distillation.Distiller``. Default: the callback's model.
      warn_static: warn when a peer model has not changed since the previous round (see above).
      verbose: 1 prints one line per round (alpha, spread, peer distance, layers) through Keras' printing
        (stdout, or absl logging after ``keras.config.disable_interactive_logging()``).
      config: a :class:`keras_graft.GraftConfig` instead of the settings criterion to final_graft.
    """

    def __init__(self, peers=None, criterion=None, a=0.4, c=500.0, level="layer", every_n_epochs=1, layers=None,
                 final_graft=False, model=None, warn_static=True, verbose=0, config=None):
        super().__init__()
        settings = dict(criterion=criterion, a=a, c=c, level=level, every_n_epochs=every_n_epochs, layers=layers,
                        final_graft=final_graft)
        if config is None:
            config = config_lib.GraftConfig(**settings, owner="Grafting")
        elif not isinstance(config, config_lib.GraftConfig):
            raise TypeError(f"Grafting: config must be None or a keras_graft.GraftConfig, got "
                            f"{checks.shown(config)}.")
        else:
            given = [name for name, value in settings.items() if value != _DEFAULTS[name]]
            if given:
                raise ValueError(f"Grafting: pass the settings either in config or as arguments, not both (got "
                                 f"config and {', '.join(given)}).")
        if model is not None and not isinstance(model, keras.Model):
            raise TypeError(f"Grafting: model must be None or the Keras model to graft, got a "
                            f"{type(model).__name__}.")
        self.config = config
        self.peers = None if peers is None else peers_lib.get(peers)
        self.warn_static = bool(warn_static)
        if isinstance(self.peers, peers_lib.ModelPeers):
            self.peers.warn_static = self.warn_static
        self.target = model
        self.verbose = checks.verbose("Grafting", verbose)
        self._grafter = None
        self._rounds = None

    criterion = property(lambda self: self.config.criterion, doc="The criterion object (see GraftConfig).")
    a = property(lambda self: self.config.a)
    c = property(lambda self: self.config.c)
    level = property(lambda self: self.config.level)
    every_n_epochs = property(lambda self: self.config.every_n_epochs)
    layers = property(lambda self: self.config.layers)
    final_graft = property(lambda self: self.config.final_graft)

    def get_config(self):
        return {**self.config.get_config(), "warn_static": self.warn_static, "verbose": self.verbose}

    @classmethod
    def from_config(cls, config):
        """A Grafting callback with these settings (peers and the grafted model are not part of the config)."""
        return cls(**config)

    def _target(self):
        return self.target if self.target is not None else self.model

    def _members(self):
        """Whether the peers of a PeerEnsemble graft together: in a ring, or each from its own scion."""
        target = self._target()
        return isinstance(target, PeerEnsemble) and (self.peers is None or self.peers.per_member)

    def _member_rounds(self):
        """The rounds of a PeerEnsemble's peers (a ring or a scion each); raises for other models."""
        target = self._target()
        if not self._members():
            raise ValueError("Grafting has no peers: fit a keras_graft.PeerEnsemble (its peers graft in a ring), "
                             "pass peers=[model, ...] or a PeerSource, or give the settings to "
                             "GraftTrainer(grafting=Grafting(...)).")
        if self.peers is None and len(target.peers) < 2:
            raise ValueError("A PeerEnsemble needs at least 2 peers to graft in a ring.")
        if self._rounds is None or self._rounds.models != list(target.peers):
            self._rounds = rounds_lib.MemberRounds(target.peers, self.config, self.peers)
        return self._rounds

    def set_model(self, model):
        """Also attaches the peer source's state to the grafted model(s), before BackupAndRestore loads weights."""
        super().set_model(model)
        target = self._target()
        if self.peers is None or not isinstance(target, keras.Model) or not (target.built and target.weights):
            return
        if self._members():
            self._member_rounds()
        else:
            self.peers.track(target)

    def grafter(self):
        """The compiled graft for this callback's model, built on first use."""
        target = self._target()
        if self._grafter is None or self._grafter.model is not target:
            if self.peers is None or self._members():
                raise ValueError("Grafting: the peers of a PeerEnsemble graft round by round together, not through "
                                 "one grafter; without a PeerEnsemble pass peers=[model, ...] or a PeerSource.")
            self.peers.track(target)
            self.peers.setup(target)
            self._grafter = self.config.grafter(target)
        return self._grafter

    def on_train_begin(self, logs=None):
        self._last_epoch = None
        self._done_round = None
        self._resumed = False
        self._set_initial_epoch = False
        if self.peers is None or self._members():
            self._healthy = [True] * len(self._member_rounds().models)
            return
        target = self._target()
        if target.built and target.weights:
            self.grafter()
            # A peer source that keeps the run's state (SharedDirectory) restores a killed run here.
            point = self.peers.restore(target, self.model, (self.params or {}).get("epochs"))
            if point is not None:
                self._resumed = True
                self._last_epoch = point.last_epoch
                self._done_round = point.last_epoch if point.round_done else None
                self._initial_epoch_before = keras_internals.initial_epoch(self.model)
                self._set_initial_epoch = True
                keras_internals.set_initial_epoch(self.model, point.start_epoch)  # where Keras' fit starts

    def round_due(self, epoch):
        """Whether a round follows (0-based) epoch ``epoch``: after epochs n, 2n, ..."""
        return self.config.round_due(epoch)

    def _idle_logs(self):
        return self._member_rounds().idle_logs() if self._members() else self.peers.idle_logs()

    def on_epoch_begin(self, epoch, logs=None):
        if getattr(self, "_resumed", False):
            self._resumed = False
            self.peers.confirm_restore(epoch)
        self._round_logs = self._idle_logs()
        self._last_epoch = epoch
        if epoch > 0 and self.round_due(epoch - 1) and getattr(self, "_done_round", None) != epoch - 1:
            self._round_logs = self._run_round(epoch - 1)

    def on_epoch_end(self, epoch, logs=None):
        if not self._members():
            self.peers.record_epoch(epoch, logs)
        if logs is None:
            return
        logs.update(self._round_logs)
        if self.peers is None:
            # A peer whose loss is NaN or Inf this epoch is not mixed into its successor at the next round.
            self._healthy = [bool(np.isfinite(logs.get(f"loss_{k}", 0.0))) for k in range(len(self._healthy))]
            logs["nonfinite_models"] = self._healthy.count(False)
            if not all(self._healthy):
                logging.warning("Epoch %d: peers %s have a non-finite loss; they are not grafted into their peers.",
                                epoch + 1, [k for k, ok in enumerate(self._healthy) if not ok])

    def on_train_end(self, logs=None):
        last = getattr(self, "_last_epoch", None)
        round_done = last is not None and getattr(self, "_done_round", None) == last
        if self.final_graft and last is not None and self.round_due(last) and not round_done:
            self._run_round(last)
            round_done = True
        if getattr(self, "_set_initial_epoch", False):
            self._set_initial_epoch = False
            keras_internals.set_initial_epoch(self.model, self._initial_epoch_before)  # a later fit starts where asked
        if not self._members():
            self.peers.finish(self._target(), last, round_done)

    def _run_round(self, round_index):
        """Grafts the round that follows epoch ``round_index``; returns its logs."""
        if self._members():
            with self._target().distribute_strategy.scope():
                graft_logs = self._member_rounds()(round_index, self._healthy)
        else:
            graft_logs = rounds_lib.merge_logs(self.peers.graft_round(self.grafter(), round_index))
        if self.verbose:
            keras_internals.print_msg(f"Grafting '{self._target().name}', round after epoch {round_index + 1}: "
                                      f"{rounds_lib.round_summary(graft_logs)}")
        return graft_logs


_DEFAULTS = dict(criterion=None, a=0.4, c=500.0, level="layer", every_n_epochs=1, layers=None, final_graft=False)


class FilterStats(keras.callbacks.Callback):
    """Logs invalid filters (L1 norm below each threshold) and the mean layer entropy after each epoch.

    It measures ``models`` (suffix ``_k`` per model when there are several), else the peers of a PeerEnsemble or
    GraftTrainer, else the model being fit.

    Keys: ``invalid_filters``, ``invalid_filter_ratio`` for a single threshold, suffixed ``_<threshold>``
    for several (``invalid_filters_0.1``), and ``mean_entropy`` over convolution kernels; with several
    :attr:`models`, one set per model suffixed ``_0``, ``_1``, ... All are NaN for a model whose measured weights
    are not finite. Computed in one compiled function per model. The model is checked when training begins,
    before any step.

    Args:
      thresholds: a number or a list of numbers, each finite and >= 0: the L1 norms below which a filter counts
        as invalid.
      bins: histogram bins of the entropy, at least 2.
      include_dense: also count the units of Dense layers as filters (needed for a model without convolutions).
      models: Keras models to measure instead of the callback's model (default: the peers of a PeerEnsemble or
        GraftTrainer, else the model).
      verbose: 1 prints one line per epoch with the statistics, through Keras' printing.
    """

    def __init__(self, thresholds=0.1, bins=10, include_dense=False, models=None, verbose=0):
        super().__init__()
        self.thresholds = _thresholds(thresholds)
        self.entropy = criteria_lib.Entropy(checks.integer("FilterStats", "bins", bins, minimum=2))
        self.include_dense = checks.boolean("FilterStats", "include_dense", include_dense)
        if models is not None:
            models = [models] if isinstance(models, keras.Model) else models
            if not isinstance(models, (list, tuple)) or not all(isinstance(m, keras.Model) for m in models):
                raise TypeError(f"FilterStats: models must be None or a list of Keras models, got "
                                f"{checks.shown(models)}.")
            models = list(models)
        self.models = models
        self.verbose = checks.verbose("FilterStats", verbose)
        self._functions = {}

    def get_config(self):
        return {"thresholds": list(self.thresholds), "bins": self.entropy.bins, "include_dense": self.include_dense,
                "verbose": self.verbose}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def _layers(self, model):
        layers = layouts.filter_layers(model, include_dense=self.include_dense)
        if layers:
            return layers
        message = f"FilterStats: model '{model.name}' has no convolution layers to measure"
        dense = [layer.name for layer in layouts.flatten_layers(model) if isinstance(layer, keras.layers.Dense)]
        if dense and not self.include_dense:
            message += (f"; it has Dense layers ({', '.join(dense[:3])}{', ...' if len(dense) > 3 else ''}): pass "
                        "FilterStats(include_dense=True) to count their units as filters")
        raise ValueError(message + ".")

    def _stats_function(self, model):
        kernels = [layouts.primary_kernel(layer) for layer in self._layers(model)]
        thresholds = tf.constant(self.thresholds, tf.float32)

        @tf.function(autograph=False)
        def stats():
            norms = tf.concat([criteria_lib.l1_norm(k.value, filter_axes=axes) for k, axes in kernels], axis=0)
            invalid = tf.reduce_sum(tf.cast(norms[None, :] < thresholds[:, None], tf.int32), axis=1)
            entropies = tf.stack([self.entropy(k.value) for k, _ in kernels])
            # A sum is finite only if every value is: NaN or Inf weights make every statistic NaN.
            finite = tf.math.is_finite(tf.reduce_sum(norms))
            return invalid, tf.size(norms), tf.reduce_mean(entropies), finite

        return stats

    def _function(self, model):
        entry = self._functions.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, self._stats_function(model))
            self._functions[id(model)] = entry
        return entry[1]

    def measure(self, model):
        """The statistics of one model as a dict of Python numbers (NaN when its weights are not finite)."""
        invalid, total, mean_entropy, finite = (t.numpy() for t in self._function(model)())
        logs = {}
        for threshold, count in zip(self.thresholds, invalid):
            suffix = "" if len(self.thresholds) == 1 else f"_{threshold:g}"
            logs[f"invalid_filters{suffix}"] = int(count) if finite else math.nan
            logs[f"invalid_filter_ratio{suffix}"] = float(count) / int(total) if finite else math.nan
        logs["mean_entropy"] = float(mean_entropy) if finite else math.nan
        return logs

    def _targets(self):
        """The measured models: :attr:`models`, else a PeerEnsemble's peers (GraftTrainer's too), else the model."""
        if self.models is not None:
            return self.models
        return list(self.model.peers) if isinstance(self.model, PeerEnsemble) else [self.model]

    def on_train_begin(self, logs=None):
        """Checks every model (and compiles its statistics) before the first step."""
        for model in self._targets():
            if model.built and model.weights:
                self._function(model)

    def on_epoch_end(self, epoch, logs=None):
        models = self._targets()
        stats = {}
        for k, model in enumerate(models):
            suffix = "" if len(models) == 1 else f"_{k}"
            stats.update({f"{key}{suffix}": value for key, value in self.measure(model).items()})
        if self.verbose:
            text = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                             for key, value in stats.items())
            keras_internals.print_msg(f"Epoch {epoch + 1}: FilterStats: {text}")
        if logs is not None:
            logs.update(stats)


def _thresholds(thresholds):
    """FilterStats thresholds as a tuple of floats; each a finite number >= 0."""
    values = thresholds if isinstance(thresholds, (list, tuple, np.ndarray)) else [thresholds]
    values = np.asarray(values, dtype=object).reshape(-1).tolist()
    if not values:
        raise ValueError("FilterStats: thresholds must hold at least one number, got an empty list.")
    for value in values:
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise TypeError(f"FilterStats: thresholds must be a number or a list of numbers, got "
                            f"{checks.shown(thresholds)}.")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"FilterStats: thresholds must be finite numbers >= 0, got {checks.shown(thresholds)}.")
    return tuple(float(v) for v in values)
