"""PeerEnsemble: N peer models as one Keras model, trained by Keras' own ``compile``/``fit``.

    peers = keras_graft.PeerEnsemble([build() for _ in range(2)])
    peers.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    peers.fit(x, y, epochs=200, validation_data=(xv, yv), callbacks=[keras_graft.Grafting()])

One ``train_step`` trains every peer, each with its own optimizer (a clone of the compiled one), through the step
GraftTrainer uses (:mod:`keras_graft.steps`); ``Grafting()`` without peers grafts them in a ring after every epoch.
In ``fit`` all peers see the same batches: their diversity comes from their initialisation and, with
``lr_spread=True``, their learning rates. :class:`keras_graft.GraftTrainer` gives each model its own data order
(and runs under MultiWorkerMirroredStrategy, where Keras 3's ``fit`` does not, keras#20585).
"""

import keras
import tensorflow as tf

from keras_graft import checks
from keras_graft import schedules as schedules_lib
from keras_graft import steps as steps_lib

_ACTIVATIONS = ("auto", None, "softmax", "sigmoid")


class _PeerMean(keras.metrics.Metric):
    """(1/N) sum_k r_k over the peers' results r_k of one metric (logs ``loss``, ``accuracy``...); no state."""

    def __init__(self, name, results):
        super().__init__(name=name)
        self._results = results

    def update_state(self, *args, **kwargs):
        pass

    def result(self):
        return keras.ops.mean(keras.ops.stack(self._results()))

    def reset_state(self):
        pass


def _spread(num_peers, lr_spread):
    """Peer k's learning rate from the compiled one: the same, or spread (a schedule scaled by the spread)."""

    def rates(rate):
        if not lr_spread:
            return [rate] * num_peers
        if isinstance(rate, (int, float)):
            return schedules_lib.spread_learning_rates(float(rate), num_peers)
        schedule = keras.optimizers.schedules.deserialize(rate)
        return [schedules_lib.Scaled(schedule, f) for f in schedules_lib.spread_learning_rates(1.0, num_peers)]

    return rates


@keras.saving.register_keras_serializable(package="keras_graft")
class PeerEnsemble(keras.Model):
    """N peer models as one Keras model whose output is the mean of the peers' probabilities,
    p(x) = (1/N) sum_k act(s_k(x)) with act the output activation (a peer whose outputs for an example are not
    finite, e.g. one that diverged, is left out of that example's mean).

    ``compile`` then ``fit`` train every peer in one step, each with its own optimizer cloned from the compiled one
    (kept in :attr:`peer_optimizers`, so ``save_weights``, ``BackupAndRestore`` and ``ModelCheckpoint`` carry their
    slots; the compiled optimizer keeps no slots and counts steps). The compiled optimizer's learning rate leads:
    when it changes (``ReduceLROnPlateau``, ``LearningRateScheduler``), peer k's becomes it times peer k's initial
    ratio to it. Loss of peer k: L_k = loss(y, s_k) + D_k (distillation) + its regularisation, see
    :mod:`keras_graft.steps`. With ``Grafting()`` in the callbacks the peers graft in a ring after every epoch (peer
    k takes from peer k - 1).

    In ``fit`` all peers see the same batches (diversity comes from initialisation and learning rates);
    :class:`keras_graft.GraftTrainer` gives each model its own data order. GraftTrainer also hands its models to
    callbacks as a PeerEnsemble: ``get_weights``/``set_weights`` cover all peers (so
    ``EarlyStopping(restore_best_weights=True)`` keeps every model).

    Logs: per peer (``loss_0``, ``accuracy_1``; ``task_loss_k`` and ``distill_loss_k`` with distillation), their
    mean (``loss``, ``accuracy``) and the ensemble's (``loss_ensemble``, ``accuracy_ensemble``), and the same with
    ``val_`` for validation. ``evaluate`` returns them in that order (``return_dict=True`` gives names);
    ``predict`` returns the ensemble's mean probabilities.

    Args:
      peers: Keras models of the same architecture, built (functional or Sequential models starting with
        ``keras.Input``).
      output_activation: "softmax" or "sigmoid" when the peers output logits, None when they output probabilities
        (or anything else averaged as is); "auto": from the compiled loss (softmax, or sigmoid for one output unit,
        when it takes logits; None before ``compile``).
    """

    def __init__(self, peers, output_activation="auto", **kwargs):
        super().__init__(**kwargs)
        if output_activation not in _ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {list(_ACTIVATIONS)}, got {output_activation!r}.")
        if not isinstance(peers, (list, tuple)) or not peers or not all(isinstance(p, keras.Model) for p in peers):
            raise TypeError(f"PeerEnsemble: peers must be a non-empty list of Keras models, got "
                            f"{checks.shown(peers)}.")
        peers = list(peers)
        self.peers = peers
        self._activation_setting = output_activation
        self.output_activation = None if output_activation == "auto" else output_activation
        self.peer_optimizers = []
        self._followed_rates = None
        self._peer_step = None
        self._compile_settings = None
        self.built = all(peer.built for peer in self.peers)

    def probabilities(self, outputs):
        """Applies the output activation to one peer's outputs."""
        if self.output_activation == "softmax":
            return keras.ops.softmax(outputs, axis=-1)
        if self.output_activation == "sigmoid":
            return keras.ops.sigmoid(outputs)
        return outputs

    def call(self, inputs, training=False):
        outputs = [self.probabilities(peer(inputs, training=training)) for peer in self.peers]
        return steps_lib.healthy_mean(outputs, [True] * len(self.peers))

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None, weighted_metrics=None,
                run_eagerly=False, steps_per_execution=1, jit_compile="auto", auto_scale_loss=True, lr_spread=False,
                distillation=None):
        """Configures training as ``keras.Model.compile``, plus:

        Args:
          optimizer: cloned for every peer (a ``LossScaleOptimizer`` each under mixed_float16 when
            ``auto_scale_loss``).
          loss: the peers' loss, e.g. ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.
          metrics: names or objects, tracked per peer, as their mean and for the ensemble.
          lr_spread: give peer k (k = 1..N) the initial rate lr * (1 + cos(pi * (N - k) / N)) / 2 (a scheduled
            rate is multiplied by that factor).
          distillation: a :class:`keras_graft.Distillation` (teachers and/or mutual learning; teachers run once per
            batch). It is not saved with the model: compile again with it after loading.

        ``loss_weights`` and ``weighted_metrics`` are not supported: the peers have one output (``fit``'s
        ``sample_weight`` and ``class_weight`` weight the loss).
        """
        if loss_weights is not None or weighted_metrics is not None:
            raise ValueError("PeerEnsemble does not support loss_weights or weighted_metrics: the peers have one "
                             "output (sample_weight and class_weight in fit weight the loss).")
        for k, peer in enumerate(self.peers):
            if not peer.built or not peer.weights:
                raise ValueError(f"Peer {k} ('{peer.name}') is not built: build the peers (start them with "
                                 "keras.Input) before compile.")
        loss_object = steps_lib.resolve_loss(loss)
        metrics = list(metrics or [])
        super().compile(optimizer=optimizer, run_eagerly=run_eagerly, steps_per_execution=steps_per_execution,
                        jit_compile=jit_compile, auto_scale_loss=auto_scale_loss)
        if self._activation_setting == "auto":
            if not getattr(self.peers[0], "outputs", None):
                raise ValueError("output_activation='auto' needs functional or Sequential peers (their output "
                                 "shape); pass output_activation='softmax', 'sigmoid' or None.")
            self.output_activation = steps_lib.output_activation(loss_object, self.peers[0].outputs[0].shape)
        num_peers = len(self.peers)
        with self.distribute_strategy.scope():
            self.optimizer.build([])  # Counts steps for TensorBoard; the peers' optimizers hold the slots.
            # Keras wraps the compiled optimizer in a LossScaleOptimizer under mixed_float16: each peer gets one.
            self.peer_optimizers = steps_lib.clone_optimizers(self.optimizer, _spread(num_peers, lr_spread))
            for peer, peer_optimizer in zip(self.peers, self.peer_optimizers):
                peer_optimizer.build(peer.trainable_variables)
            self._followed_rates = schedules_lib.FollowedRates.create(self.optimizer, self.peer_optimizers)
            if distillation is not None:
                distillation.build(self.peers)
            terms = ("task_loss", "distill_loss") if distillation is not None else ()
            trackers = [steps_lib.Tracker(metrics, f"_{k}", terms) for k in range(num_peers)]
            ensemble = steps_lib.Tracker(metrics, "_ensemble")
            self._peer_means = [
                _PeerMean(name, lambda name=name: [tracker.metric(name).result() for tracker in trackers])
                for name in trackers[0].names()
            ]
        self._peer_step = steps_lib.PeerStep(self.peers, self.peer_optimizers, loss_object, trackers, distillation,
                                             ensemble, self.probabilities)
        self._compile_settings = {
            "optimizer": optimizer, "loss": loss, "metrics": metrics, "run_eagerly": run_eagerly,
            "steps_per_execution": steps_per_execution, "jit_compile": jit_compile,
            "auto_scale_loss": auto_scale_loss, "lr_spread": lr_spread,
        }

    @property
    def metrics(self):
        if getattr(self, "_peer_step", None) is None:
            return super().metrics
        return [*self._peer_means, *self._peer_step.metrics()]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        batches = [(x, y, sample_weight)] * len(self.peers)
        if self._followed_rates is not None:
            self._followed_rates()
        losses = self._peer_step.train(batches, shared=True, score_ensemble=True)
        with tf.control_dependencies(losses):
            self.optimizer.iterations.assign_add(1)
        return self.get_metrics_result()

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._peer_step.test(x, y, sample_weight)
        return self.get_metrics_result()

    def get_config(self):
        return {
            **super().get_config(),
            "peers": [keras.saving.serialize_keras_object(peer) for peer in self.peers],
            "output_activation": self.output_activation,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["peers"] = [keras.saving.deserialize_keras_object(peer) for peer in config["peers"]]
        return cls(**config)

    def get_compile_config(self):
        if self._compile_settings is None:
            return {}
        return keras.saving.serialize_keras_object(self._compile_settings)

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
