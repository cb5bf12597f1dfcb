"""The train and test step of N peer models, written once for both loops: PeerEnsemble (Keras ``fit``) and
GraftTrainer (a custom loop).

Model k's loss on its batch (x_k, y_k) is

    L_k = task(y_k, s_k) + D_k + R_k / replicas,

with s_k its outputs, task the compiled loss, D_k its distillation term (:class:`keras_graft.Distillation`, when
given) and R_k the model's own losses (weight regularisation). Keras losses with the default reduction divide the
per-replica mean by the number of replicas (``keras.src.losses.loss.scale_loss_for_distribution``) and the
optimizer sums gradients over replicas, so the update uses the global-batch mean; R_k is divided here for the
same reason, and logged losses are multiplied back.

Model k's optimizer applies the gradient of ``scale_loss(L_k)``: a ``keras.optimizers.LossScaleOptimizer`` (mixed
float16) multiplies by its dynamic scale and divides the gradients back, other optimizers pass L_k through.

The train step is atomic. The forward passes run in a ``keras.StatelessScope``, which collects the updates of
non-trainable state (BatchNormalization statistics, dropout seeds) instead of applying them; every L_k and every
gradient is computed, on every replica; only then do the optimizers apply the gradients, the collected state get
assigned and the metrics get updated. A batch that fails (a label out of range) changes no weight, statistic,
optimizer slot or metric of any model.
"""

import keras
import tensorflow as tf

_ACCURACY_NAMES = ("accuracy", "acc")


def resolve_loss(loss):
    """A Keras Loss object (its reduction scales by the number of replicas) from an identifier."""
    if loss is None:
        raise ValueError("Training the peers needs a loss, e.g. "
                         "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
    if isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str):
        class_name = "".join(part.capitalize() for part in loss.split("_"))
        try:
            resolved = keras.losses.get(class_name)
        except ValueError:
            resolved = keras.losses.get(loss)
    else:
        resolved = keras.losses.get(loss)
    if isinstance(resolved, keras.losses.Loss):
        return resolved
    if callable(resolved):
        return keras.losses.LossFunctionWrapper(resolved, name=getattr(resolved, "__name__", None))
    raise ValueError(f"Cannot interpret loss {loss!r}.")


def probability_loss(loss):
    """The same loss on probabilities (from_logits=False), to score the ensemble's averaged probabilities."""
    config = loss.get_config()
    if not config.get("from_logits"):
        return loss
    return loss.__class__.from_config({**config, "from_logits": False})


def output_activation(loss, output_shape):
    """"softmax" or "sigmoid" (one output unit) when ``loss`` takes logits, None when it takes probabilities."""
    if not loss.get_config().get("from_logits"):
        return None
    return "sigmoid" if output_shape[-1] == 1 else "softmax"


def clone_optimizers(optimizer, learning_rates, loss_scale=False):
    """One independent copy of ``optimizer`` per model, model k's with learning rate ``learning_rates(rate)[k]``.

    ``rate`` is the optimizer's own (a number, or a schedule's config). The copies are ``LossScaleOptimizer``s when
    ``loss_scale`` (mixed float16) or when ``optimizer`` is one (they then take its settings).
    """
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    inner = optimizer.inner_optimizer if scaled else optimizer
    config = inner.get_config()
    copies = [inner.__class__.from_config({**config, "learning_rate": rate})
              for rate in learning_rates(config["learning_rate"])]
    if not (scaled or loss_scale):
        return copies
    settings = {}
    if scaled:
        settings = {"initial_scale": optimizer.initial_scale, "dynamic_growth_steps": optimizer.dynamic_growth_steps}
    return [keras.optimizers.LossScaleOptimizer(copy, **settings) for copy in copies]


def healthy_mean(probabilities, healthy):
    """The ensemble's mean over the models flagged healthy whose outputs for an example are finite.

    An example for which no healthy model has finite outputs takes the mean over the models that do; NaN when none
    does. So one diverged (NaN or exploded) model never turns the ensemble's predictions into NaN.
    """
    stacked = tf.stack([tf.convert_to_tensor(p) for p in probabilities])  # (models, batch, ...)
    flat = tf.reshape(stacked, [tf.shape(stacked)[0], tf.shape(stacked)[1], -1])
    finite = tf.reduce_all(tf.math.is_finite(flat), axis=-1)  # (models, batch)
    use = tf.logical_and(finite, tf.reshape(tf.cast(healthy, tf.bool), [-1, 1]))
    use = tf.where(tf.reduce_any(use, axis=0, keepdims=True), use, finite)
    weights = tf.reshape(tf.cast(use, stacked.dtype),
                         tf.concat([tf.shape(use), tf.ones([tf.rank(stacked) - 2], tf.int32)], 0))
    values = tf.where(tf.cast(weights, tf.bool), stacked, tf.zeros_like(stacked))
    return tf.reduce_sum(values * weights, axis=0) / tf.reduce_sum(weights, axis=0)


def replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _accuracy(y_true, y_pred):
    """Keras' "accuracy" as ``compile`` resolves it, chosen from the shapes when the step is traced."""
    if y_pred.shape[-1] == 1:
        return keras.metrics.binary_accuracy(y_true, y_pred)
    if len(y_true.shape) < len(y_pred.shape) or y_true.shape[-1] == 1:
        return keras.metrics.sparse_categorical_accuracy(y_true, y_pred)
    return keras.metrics.categorical_accuracy(y_true, y_pred)


def _metric(spec, suffix):
    """(base name, a new metric named base name + suffix) from a metric name, object or function."""
    if isinstance(spec, str) and spec in _ACCURACY_NAMES:
        return spec, keras.metrics.MeanMetricWrapper(_accuracy, name=spec + suffix)
    metric = spec if isinstance(spec, keras.metrics.Metric) else keras.metrics.get(spec)
    name = spec if isinstance(spec, str) else getattr(metric, "name", None) or metric.__name__  # as compile logs it
    if isinstance(metric, keras.metrics.Metric):
        return name, metric.__class__.from_config({**metric.get_config(), "name": name + suffix})
    return name, keras.metrics.MeanMetricWrapper(metric, name=name + suffix)


class Tracker:
    """Loss, loss terms and metrics of one model (``suffix="_k"``) or of the ensemble (``"_ensemble"``).

    Create it in the strategy's scope: metric variables are synchronised on read, so results read in
    cross-replica context cover all replicas.
    """

    def __init__(self, metric_specs, suffix, loss_terms=()):
        self.loss = keras.metrics.Mean(name="loss" + suffix)
        self.terms = {name: keras.metrics.Mean(name=name + suffix) for name in loss_terms}
        self.metrics = dict(_metric(spec, suffix) for spec in metric_specs)

    def names(self):
        """Base names of the results: ``loss``, the metrics, the loss terms."""
        return ["loss", *self.metrics, *self.terms]

    def metric(self, name):
        """The metric object behind base name ``name``."""
        if name == "loss":
            return self.loss
        return self.metrics[name] if name in self.metrics else self.terms[name]

    def all(self):
        """The metric objects, named with the suffix (``loss_0``, ``accuracy_0``, ``task_loss_0``)."""
        return [self.metric(name) for name in self.names()]

    def update(self, loss, y, y_pred):
        """``loss`` is the per-replica loss as the optimizer sees it (divided by the number of replicas)."""
        self.loss.update_state(loss * replicas(), sample_weight=tf.shape(y_pred)[0])
        for metric in self.metrics.values():
            metric.update_state(y, y_pred)

    def update_terms(self, batch_size, **terms):
        """Parts of the loss (task_loss, distill_loss), per replica as the optimizer sees them."""
        for name, value in terms.items():
            self.terms[name].update_state(value * replicas(), sample_weight=batch_size)

    def results(self):
        """Results by base name: ``{"loss": ..., "accuracy": ..., "task_loss": ...}``."""
        return {name: self.metric(name).result() for name in self.names()}

    def reset(self):
        for metric in self.all():
            metric.reset_state()


class PeerStep:
    """One train step and one test step over N peer models, each with its own optimizer and tracker.

    Args:
      models: the N Keras models.
      optimizers: model k's optimizer, built on its trainable variables.
      loss: a Keras Loss object.
      trackers: model k's :class:`Tracker` (with ``task_loss`` and ``distill_loss`` terms under distillation).
      distillation: a built :class:`keras_graft.Distillation`, or None.
      ensemble_tracker: scores the ensemble (mean of the models' probabilities) on shared batches; None: not scored.
      probabilities: the function from a model's outputs to probabilities (``PeerEnsemble.probabilities``).
      healthy: a boolean variable, one entry per model: the ensemble averages the healthy models only (see
        :func:`healthy_mean`); None: all models (an example still leaves out those whose outputs are not finite).
    """

    def __init__(self, models, optimizers, loss, trackers, distillation=None, ensemble_tracker=None,
                 probabilities=None, healthy=None):
        self.models = list(models)
        self.optimizers = list(optimizers)
        self.loss = loss
        self.trackers = list(trackers)
        self.distillation = distillation
        self.ensemble_tracker = ensemble_tracker
        self.probabilities = probabilities
        self.healthy = healthy
        self._ensemble_loss = probability_loss(loss)

    def metrics(self):
        """Every metric object: the models' in order, then the ensemble's."""
        trackers = self.trackers + ([self.ensemble_tracker] if self.ensemble_tracker is not None else [])
        return [metric for tracker in trackers for metric in tracker.all()]

    def _losses(self, predictions, batches, shared):
        """Per model: L_k, and its (task, distillation) terms when distilling (else None)."""
        task = [self.loss(y, y_pred, sample_weight=w) for y_pred, (_, y, w) in zip(predictions, batches)]
        distill = None
        if self.distillation is not None:
            distillation = self.distillation
            logits = [keras.ops.cast(p, "float32") for p in predictions]
            if shared:  # One batch for all: the teachers run once.
                distill = distillation.losses(logits, distillation.teacher_probabilities(batches[0][0]))
            else:
                distill = [distillation.losses([z], distillation.teacher_probabilities(x))[0]
                           for z, (x, _, _) in zip(logits, batches)]
        totals = []
        for k, model in enumerate(self.models):
            total = task[k] if distill is None else task[k] + distill[k]
            own = model.losses
            totals.append(total + tf.add_n(own) / replicas() if own else total)
        return totals, None if distill is None else list(zip(task, distill))

    def _update_metrics(self, totals, terms, predictions, batches, score_ensemble):
        for k, (tracker, total, y_pred, (_, y, _)) in enumerate(zip(self.trackers, totals, predictions, batches)):
            tracker.update(total, y, y_pred)
            if terms is not None:
                tracker.update_terms(tf.shape(y_pred)[0], task_loss=terms[k][0], distill_loss=terms[k][1])
        if score_ensemble and self.ensemble_tracker is not None:
            _, y, sample_weight = batches[0]
            probabilities = [self.probabilities(p) for p in predictions]
            ensemble = healthy_mean(probabilities, [True] * len(self.models) if self.healthy is None else self.healthy)
            self.ensemble_tracker.update(self._ensemble_loss(y, ensemble, sample_weight=sample_weight), y, ensemble)

    def train(self, batches, shared, score_ensemble=False):
        """Trains every model on its batch; returns the losses L_k (an op that depends on them runs only once every
        loss and gradient of the step has been computed).

        ``batches``: model k's ``(x, y, sample_weight)``; ``shared``: all models get the same batch (the teachers
        then run once); ``score_ensemble``: also score the ensemble (shared batches only).
        """
        variables = [model.trainable_variables for model in self.models]
        with tf.GradientTape() as tape:
            reads = [(v, v.value) for model_variables in variables for v in model_variables]
            with keras.StatelessScope(state_mapping=reads, collect_losses=True) as scope:
                read = {id(v): scope.get_current_value(v) for v, _ in reads}
                predictions = [model(x, training=True) for model, (x, _, _) in zip(self.models, batches)]
                totals, terms = self._losses(predictions, batches, shared)
            scaled = tf.add_n([optimizer.scale_loss(total) for optimizer, total in zip(self.optimizers, totals)])
        # The models are independent (other students' predictions are held constant), so the gradient of the sum
        # with respect to model k is the gradient of its own scaled loss.
        gradients = tape.gradient(scaled, variables)
        updates = []
        for model in self.models:
            for variable in model.variables:
                value = scope.get_current_value(variable)
                if value is not None and value is not read.get(id(variable)):
                    updates.append((variable, value))
        # Everything below waits for every loss and gradient of every replica (one scalar all-reduce): a failure
        # above changes nothing.
        flat = [g for model_gradients in gradients for g in model_gradients if g is not None]
        with tf.control_dependencies([*totals, *flat]):
            computed = tf.zeros([])
        computed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, computed)
        with tf.control_dependencies([computed]):
            for optimizer, model_gradients, model_variables in zip(self.optimizers, gradients, variables):
                optimizer.apply_gradients(zip(model_gradients, model_variables))
            for variable, value in updates:
                variable.assign(value)
            totals = [tf.identity(total) for total in totals]
            predictions = [tf.identity(p) for p in predictions]
            if terms is not None:
                terms = [(tf.identity(task), tf.identity(distill)) for task, distill in terms]
        self._update_metrics(totals, terms, predictions, batches, score_ensemble=shared and score_ensemble)
        return totals

    def test(self, x, y, sample_weight=None):
        """Scores every model (and the ensemble) on one batch."""
        predictions = [model(x, training=False) for model in self.models]
        batches = [(x, y, sample_weight)] * len(self.models)
        totals, terms = self._losses(predictions, batches, shared=True)
        self._update_metrics(totals, terms, predictions, batches, score_ensemble=True)
