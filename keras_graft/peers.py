"""Where grafting peers come from. A peer source runs one graft round for a model.

The interface is small: ``track(model)`` attaches the source's state (if it keeps one) to the model so that its
checkpoints carry it, ``setup(model)`` validates the peers once before training, and
``graft_round(grafter, round_index)`` brings the peers' weights for that round and grafts them with the given
:class:`keras_graft.grafting.Grafter`, returning one :class:`GraftResult` per peer grafted. A source with
``per_member = True`` (the scions) also serves each of N models trained together (GraftTrainer, PeerEnsemble):
``for_member(k)`` is model k's own copy.
"""

import abc

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import grafting
from keras_graft import keras_internals


class SourceState(keras.layers.Layer):
    """A peer source's state for one model: named int64 scalars, attached by :func:`attach_state`."""

    def __init__(self, values, **kwargs):
        super().__init__(trainable=False, **kwargs)
        for name, value in values.items():
            variable = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False, name=name)
            variable.assign(int(value))
            setattr(self, name, variable)  # an attribute per variable: tf.train.Checkpoint tracks attributes
        self.built = True


def attach_state(model, attribute, values):
    """A new :class:`SourceState` holding ``values``, attached to ``model`` as ``attribute``.

    As RePr's state, through :func:`keras_graft.keras_internals.attach_state`: Keras' weight files
    ``BackupAndRestore``, ``ModelCheckpoint``) and ``tf.train.Checkpoint`` (GraftTrainer's ``backup_dir``) carry it,
    and it stays out of ``model.layers`` and ``model.weights``. Attach before a checkpoint is loaded.
    """
    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    with strategy.scope():
        state = SourceState(values, name=f"{attribute.strip('_')}_{model.name}")
    keras_internals.attach_state(model, attribute, state)
    return state


class PeerSource(abc.ABC):
    """Supplies peer weights to a :class:`keras_graft.Grafting` callback."""

    #: Whether :meth:`for_member` gives each model of a GraftTrainer or PeerEnsemble its own source.
    per_member = False

    def for_member(self, index):
        """The source of model ``index`` of N models trained together (only where ``per_member``)."""
        raise ValueError(f"{type(self).__name__} has no per-model copies.")

    def track(self, model):
        """Attaches the state this source keeps for ``model`` (before checkpoints load). Default: none."""

    def setup(self, model):
        """Checks the peers against ``model`` before any weight changes. Default: nothing to check."""

    def idle_logs(self):
        """The logs of an epoch without a round: the keys ``graft_round``'s results log, at their neutral values
        (alpha 1, spread and peer distance 0, 0 layers), so that CSVLogger sees the same columns every epoch."""
        return grafting.idle_logs()

    def restore(self, model, fit_model, epochs):
        """Before training: loads the state a killed run left, if the source keeps one (SharedDirectory does).

        ``model`` is the grafted model, ``fit_model`` the one ``fit`` trains, ``epochs`` fit's argument. Returns None
        (start as fit was asked) or an object with ``start_epoch``, ``last_epoch`` (the last epoch trained) and
        ``round_done`` (whether the round after it already ran). Default: None.
        """
        return None

    def confirm_restore(self, epoch):
        """The first epoch after a restore begins at ``epoch``; raises if that is not where the state ends."""

    def record_epoch(self, epoch, logs):
        """An epoch ended with these logs (the loss a SharedDirectory publishes with the weights)."""

    def finish(self, model, last_epoch, round_done):
        """``fit`` returned after ``last_epoch`` (None: no epoch ran); ``round_done``: the round after it ran."""

    @abc.abstractmethod
    def graft_round(self, grafter, round_index):
        """Grafts the peers' weights of round ``round_index`` into ``grafter.model``; returns GraftResults."""


class ModelPeers(PeerSource):
    """Peers that are Keras models in this program; their current weights are read in-graph.

    With several peers the model grafts them one after another in the given order. Nothing here trains them: with
    ``warn_static`` a peer whose weights have not changed since the previous round (or since training began) is
    named in a warning, once. Its weights are compared through one in-graph checksum per peer, (sum w, sum w^2)
    in float64, a single host transfer per round.
    """

    def __init__(self, models, warn_static=True):
        models = list(models)
        if not models:
            raise ValueError("Grafting needs at least one peer model.")
        for k, peer in enumerate(models):
            if not isinstance(peer, keras.Model):
                raise TypeError(f"Peers must be Keras models or a PeerSource, got peer {k} = "
                                f"{checks.shown(peer)} (a {type(peer).__name__}).")
        self.models = models
        self.warn_static = warn_static
        self._checksums = None
        self._previous = None
        self._warned = set()

    def setup(self, model):
        for k, peer in enumerate(self.models):
            if peer is model:
                raise ValueError(f"Peer {k} is the model being trained ('{model.name}'); a model cannot graft itself.")
            if not peer.built or not peer.weights:
                raise ValueError(f"Peer {k} ('{peer.name}') is not built; build it before grafting.")
            grafting.check_compatible(model, grafting.weight_specs(peer), f"Peer {k} ('{peer.name}')")
        self._checksums = tf.function(self._checksum_values, autograph=False)
        self._previous = self._checksums().numpy()
        self._warned = set()

    def _checksum_values(self):
        """[N, 2]: per peer, the sum and the sum of squares of all its weights, in float64."""
        rows = []
        for peer in self.models:
            values = [tf.cast(tf.reshape(w.value, [-1]), tf.float64) for w in peer.weights]
            rows.append(tf.stack([tf.add_n([tf.reduce_sum(v) for v in values]),
                                  tf.add_n([tf.reduce_sum(tf.square(v)) for v in values])]))
        return tf.stack(rows)

    def _warn_if_static(self):
        current = self._checksums().numpy()
        for k in np.flatnonzero(np.all(current == self._previous, axis=1)):
            if k not in self._warned:
                self._warned.add(k)
                logging.warning(
                    "Grafting: peer %d ('%s') has the same weights as at the previous round: it is not training, so "
                    "every round mixes the same fixed weights into the model. That is right for a fixed pre-trained "
                    "donor (pass warn_static=False to silence this warning); to train peers side by side, fit a "
                    "keras_graft.PeerEnsemble with Grafting() or use keras_graft.GraftTrainer.",
                    k, self.models[k].name)
        self._previous = current

    def graft_round(self, grafter, round_index):
        if self.warn_static and self._checksums is not None:
            self._warn_if_static()
        return [grafter.graft_model(peer) for peer in self.models]


def get(peers):
    """A PeerSource from a PeerSource, a Keras model, or a list of Keras models."""
    if isinstance(peers, PeerSource):
        return peers
    if isinstance(peers, keras.Model):
        return ModelPeers([peers])
    if isinstance(peers, (list, tuple)):
        return ModelPeers(peers)
    raise TypeError(f"peers must be a Keras model, a list of models or a PeerSource, got {checks.shown(peers)} "
                    f"(a {type(peers).__name__}).")
