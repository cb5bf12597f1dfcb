"""Keras callbacks: Grafting for ``model.fit``, and FilterStats to log invalid filters and entropy."""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import criteria as criteria_lib
from keras_graft import grafting
from keras_graft import layouts
from keras_graft import peers as peers_lib
from keras_graft.ensemble import PeerEnsemble


class Grafting(keras.callbacks.Callback):
    """Grafts peers' weights into the model after every ``every_n_epochs``-th epoch.

    Who trains the peers, in each usage:

    - ``PeerEnsemble.fit(..., callbacks=[Grafting()])``: the ensemble's own train step trains every peer, and the
      peers graft in a ring (peer k takes from peer k - 1, reading the weights from before the round). Peers whose
      epoch loss (``loss_k``) is NaN or Inf are not mixed into their successor (``nonfinite_models`` counts them).
    - ``GraftTrainer(grafting=Grafting(...))``: the trainer trains its models and grafts them in a ring; it reads
      only this callback's settings.
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

    Adds to ``logs`` every epoch, describing the round that opened it (alpha 1 and 0 layers when none did):
    ``graft_alpha`` (mean coefficient of the model's own weights), ``graft_layers`` (groups grafted) and
    ``graft_skipped_layers`` (groups whose peer weights were not finite); in a ring also per peer
    (``graft_alpha_k``...) and ``nonfinite_models``. Put it before CSVLogger or TensorBoard in the callback list
    so they record these values.

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
      verbose: 1 logs each round's mean alpha.
    """

    def __init__(self, peers=None, criterion=None, a=0.4, c=500.0, level="layer", every_n_epochs=1, layers=None,
                 final_graft=False, model=None, warn_static=True, verbose=0):
        super().__init__()
        grafting.validate_hyperparameters(a, c, level)
        if int(every_n_epochs) != every_n_epochs or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}.")
        self.peers = None if peers is None else peers_lib.get(peers)
        self.warn_static = bool(warn_static)
        if isinstance(self.peers, peers_lib.ModelPeers):
            self.peers.warn_static = self.warn_static
        self.criterion = criteria_lib.get(criterion or grafting.default_criterion(level))
        self.a = float(a)
        self.c = float(c)
        self.level = level
        self.every_n_epochs = int(every_n_epochs)
        self.layers = layers
        self.final_graft = bool(final_graft)
        self.target = model
        self.verbose = verbose
        self._grafter = None
        self._ring = None

    def get_config(self):
        return {
            "criterion": criteria_lib.serialize(self.criterion),
            "a": self.a,
            "c": self.c,
            "level": self.level,
            "every_n_epochs": self.every_n_epochs,
            "layers": self.layers if not callable(self.layers) else None,
            "final_graft": self.final_graft,
            "warn_static": self.warn_static,
            "verbose": self.verbose,
        }

    def _target(self):
        return self.target if self.target is not None else self.model

    def _ring_peers(self):
        """The models of the ring this callback grafts (peers=None on a PeerEnsemble); raises for other models."""
        target = self._target()
        if not isinstance(target, PeerEnsemble):
            raise ValueError("Grafting has no peers: fit a keras_graft.PeerEnsemble (its peers graft in a ring), "
                             "pass peers=[model, ...] or a PeerSource, or give the settings to "
                             "GraftTrainer(grafting=Grafting(...)).")
        if len(target.peers) < 2:
            raise ValueError("A PeerEnsemble needs at least 2 peers to graft in a ring.")
        return list(target.peers)

    def grafter(self):
        """The compiled graft for this callback's model, built on first use."""
        target = self._target()
        if self._grafter is None or self._grafter.model is not target:
            if self.peers is None:
                self._ring_peers()
            self.peers.setup(target)
            self._grafter = grafting.Grafter(target, self.criterion, self.a, self.c, self.level, self.layers)
        return self._grafter

    def on_train_begin(self, logs=None):
        if self.peers is None:
            peers = self._ring_peers()
            if self._ring is None or self._ring.models != peers:
                self._ring = grafting.RingGrafter(peers, self.criterion, self.a, self.c, self.level, self.layers)
            self._healthy = [True] * len(peers)
            return
        target = self._target()
        if target.built and target.weights:
            self.grafter()

    def round_due(self, epoch):
        """Whether a round follows (0-based) epoch ``epoch``: after epochs n, 2n, ..."""
        return (epoch + 1) % self.every_n_epochs == 0

    def _idle_logs(self):
        return idle_ring_logs(len(self._ring.models)) if self.peers is None else self.peers.idle_logs()

    def on_epoch_begin(self, epoch, logs=None):
        self._round_logs = self._idle_logs()
        self._last_epoch = epoch
        if epoch > 0 and self.round_due(epoch - 1):
            self._round_logs = self._run_round(epoch - 1)

    def on_epoch_end(self, epoch, logs=None):
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
        if self.final_graft and last is not None and self.round_due(last):
            self._run_round(last)

    def _run_round(self, round_index):
        """Grafts the round that follows epoch ``round_index``; returns its logs."""
        if self.peers is None:
            with self._target().distribute_strategy.scope():
                graft_logs = ring_logs(self._ring(self._healthy))
        else:
            graft_logs = merge_logs(self.peers.graft_round(self.grafter(), round_index))
        if self.verbose:
            logging.info("Round after epoch %d: grafted %s", round_index + 1, graft_logs)
        return graft_logs


def idle_ring_logs(num_models):
    """The logs of a ring epoch that no round opened: alpha 1, no layers grafted or skipped."""
    return ring_logs([grafting.GraftResult([], [], [])] * num_models)


def ring_logs(results):
    """Logs of a ring round: per model (``graft_alpha_k``...) and merged over models (``graft_alpha``...)."""
    logs = merge_logs(results)
    for k, result in enumerate(results):
        logs.update({f"{key}_{k}": value for key, value in result.logs().items()})
    return logs


def merge_logs(results):
    """One set of graft logs for several GraftResults: mean ``graft_alpha``, every other key summed."""
    if not results:
        return {}
    merged = {}
    for result in results:
        for key, value in result.logs().items():
            merged.setdefault(key, []).append(value)
    logs = {key: int(np.sum(values)) for key, values in merged.items() if key != "graft_alpha"}
    logs["graft_alpha"] = float(np.mean(merged["graft_alpha"]))
    return logs


class FilterStats(keras.callbacks.Callback):
    """Logs invalid filters (L1 norm below each threshold) and the mean layer entropy after each epoch.

    It measures ``models`` (suffix ``_k`` per model when there are several), else the peers of a PeerEnsemble or
    GraftTrainer, else the model being fit.

    Keys: ``invalid_filters``, ``invalid_filter_ratio`` for a single threshold, suffixed ``_<threshold>``
    for several (``invalid_filters_0.1``), and ``mean_entropy`` over convolution kernels. Computed in one compiled
    function per model.
    """

    def __init__(self, thresholds=0.1, bins=10, include_dense=False, models=None):
        super().__init__()
        self.thresholds = tuple(np.atleast_1d(thresholds).astype(float).tolist())
        if not self.thresholds or any(t < 0 for t in self.thresholds):
            raise ValueError(f"FilterStats thresholds must be >= 0, got {thresholds!r}.")
        self.entropy = criteria_lib.Entropy(bins)
        self.include_dense = include_dense
        self.models = models
        self._functions = {}

    def get_config(self):
        return {"thresholds": list(self.thresholds), "bins": self.entropy.bins, "include_dense": self.include_dense}

    def _stats_function(self, model):
        layers = layouts.filter_layers(model, include_dense=self.include_dense)
        if not layers:
            raise ValueError(f"Model '{model.name}' has no convolution layers for FilterStats to measure.")
        kernels = [layouts.primary_kernel(layer) for layer in layers]
        thresholds = tf.constant(self.thresholds, tf.float32)

        @tf.function(autograph=False)
        def stats():
            norms = tf.concat([criteria_lib.l1_norm(k.value, filter_axes=axes) for k, axes in kernels], axis=0)
            invalid = tf.reduce_sum(tf.cast(norms[None, :] < thresholds[:, None], tf.int32), axis=1)
            entropies = tf.stack([self.entropy(k.value) for k, _ in kernels])
            return invalid, tf.size(norms), tf.reduce_mean(entropies)

        return stats

    def measure(self, model):
        """The statistics of one model as a dict of Python numbers."""
        if id(model) not in self._functions:
            self._functions[id(model)] = self._stats_function(model)
        invalid, total, mean_entropy = (t.numpy() for t in self._functions[id(model)]())
        logs = {}
        for threshold, count in zip(self.thresholds, invalid):
            suffix = "" if len(self.thresholds) == 1 else f"_{threshold:g}"
            logs[f"invalid_filters{suffix}"] = int(count)
            logs[f"invalid_filter_ratio{suffix}"] = float(count) / int(total)
        logs["mean_entropy"] = float(mean_entropy)
        return logs

    def on_epoch_end(self, epoch, logs=None):
        models = self.models
        if models is None:
            models = self.model.peers if isinstance(self.model, PeerEnsemble) else [self.model]
        stats = {}
        for k, model in enumerate(models):
            suffix = "" if len(models) == 1 else f"_{k}"
            stats.update({f"{key}{suffix}": value for key, value in self.measure(model).items()})
        if logs is not None:
            logs.update(stats)
