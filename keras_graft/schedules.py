"""Learning rates of grafting peers: the initial spread between models and per-step schedules in epoch units.

Meng et al., "Filter Grafting for Deep Neural Networks" (CVPR 2020) make the peers diverse with different initial
learning rates, cosine annealing and their own data order. ``spread_learning_rates`` gives model k (k = 1..N)

    lr_k = lr * (1 + cos(pi * (N - k) / N)) / 2,

so model N keeps ``lr`` and model 1 gets the smallest rate. The schedules are Keras ``LearningRateSchedule``
objects evaluated every optimizer step t; their lengths are in epochs, and ``steps_per_epoch`` (and ``epochs``) may
be ``tf.Variable`` objects that GraftTrainer sets when ``fit`` knows them. ``FollowedRates`` lets Keras'
learning-rate callbacks, which set ``model.optimizer.learning_rate``, reach every peer.
"""

import math

import keras
import tensorflow as tf

from keras_graft import checks


def spread_learning_rates(learning_rate, num_models):
    """[lr * (1 + cos(pi * (N - k) / N)) / 2 for k = 1..N]: the peers' initial learning rates."""
    if int(num_models) != num_models or num_models < 1:
        raise ValueError(f"num_models must be a positive integer, got {num_models!r}.")
    n = int(num_models)
    return [learning_rate * (1.0 + math.cos(math.pi * (n - k) / n)) / 2.0 for k in range(1, n + 1)]


def _rate_variable(optimizer):
    """The optimizer's learning-rate variable (through a LossScaleOptimizer), or None for a schedule or callable."""
    rate = optimizer.learning_rate
    return rate if isinstance(rate, keras.Variable) else None


class FollowedRates:
    """Followers' learning rates that follow a leading optimizer's.

    Keras' ``ReduceLROnPlateau`` and ``LearningRateScheduler`` set ``model.optimizer.learning_rate``; the peers train
    with optimizers of their own. Called in every training step (in-graph), this sets follower k's rate to
    ``lead * r_k`` whenever the leader's rate differs from the one last seen, with ``r_k`` the follower's initial
    rate over the leader's (so lr_spread's spread is kept). An unchanged leader changes nothing. The last seen rate
    is not checkpointed: after a restore the first step sets the followers to the values they were saved with.

    Use ``FollowedRates.create``: it gives None where there is nothing to follow (a scheduled rate, which Keras'
    callbacks cannot set, or a leader at rate 0).
    """

    def __init__(self, leader, followers):
        self._leader = _rate_variable(leader)
        lead = float(self._leader.numpy())
        rates = [_rate_variable(follower) for follower in followers]
        self._followers = [(rate, float(rate.numpy()) / lead) for rate in rates if rate is not self._leader]
        self._seen = tf.Variable(lead, trainable=False, dtype=self._leader.dtype, name="followed_learning_rate",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @classmethod
    def create(cls, leader, followers):
        """A FollowedRates (call it in the strategy's scope), or None when the rates are not plain variables."""
        variables = [_rate_variable(optimizer) for optimizer in [leader, *followers]]
        if any(v is None for v in variables) or float(variables[0].numpy()) == 0.0:
            return None
        return cls(leader, followers)

    def __call__(self):
        """Updates the followers if the leader's rate changed (once, in cross-replica context); returns whether it
        did."""
        context = tf.distribute.get_replica_context()
        if context is None:
            return self._follow()
        return context.merge_call(lambda strategy: self._follow())

    def _follow(self):
        lead = tf.convert_to_tensor(self._leader)

        def follow():
            for rate, ratio in self._followers:
                rate.assign(lead * ratio)
            self._seen.assign(lead)
            return tf.constant(True)

        return tf.cond(tf.equal(lead, self._seen), lambda: tf.constant(False), follow)


def _as_int(value):
    return int(value.numpy()) if isinstance(value, tf.Variable) else int(value)


@keras.saving.register_keras_serializable(package="keras_graft")
class CosineAnnealing(keras.optimizers.schedules.LearningRateSchedule):
    """Per-step cosine annealing over ``epochs`` epochs (SGDR without restarts, torch's CosineAnnealingLR).

    lr_t = lr_min + (lr_0 - lr_min) * (1 + cos(pi * min(t, T) / T)) / 2 with T = epochs * steps_per_epoch and
    lr_min = alpha * lr_0 (Loshchilov & Hutter, "SGDR", ICLR 2017, eq. 5).
    """

    def __init__(self, initial_learning_rate, epochs, steps_per_epoch, alpha=0.0):
        checks.number("CosineAnnealing", "initial_learning_rate", initial_learning_rate)
        checks.number("CosineAnnealing", "alpha", alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"CosineAnnealing alpha must lie in [0, 1], got {alpha}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.alpha = float(alpha)

    def __call__(self, step):
        total = tf.cast(tf.maximum(self.epochs * self.steps_per_epoch, 1), tf.float32)
        progress = tf.minimum(tf.cast(step, tf.float32), total) / total
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.initial_learning_rate * (self.alpha + (1.0 - self.alpha) * cosine)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "epochs": _as_int(self.epochs),
            "steps_per_epoch": _as_int(self.steps_per_epoch),
            "alpha": self.alpha,
        }


@keras.saving.register_keras_serializable(package="keras_graft")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr_t = lr_0 * factor ** floor(t / (every_epochs * steps_per_epoch)) (torch's StepLR, counted in steps), or
    lr_0 * factor ** #{m in milestones : m * steps_per_epoch <= t} (torch's MultiStepLR) with ``milestones``.

    The papers' CIFAR protocol divides the rate by 10 every 60 epochs: ``StepDecay(0.1, 60, steps_per_epoch)``.
    A shortened protocol with phases of unequal length: ``StepDecay(0.1, None, steps, milestones=[11, 15])``.
    """

    def __init__(self, initial_learning_rate, every_epochs=None, steps_per_epoch=1, factor=0.1, milestones=None):
        checks.number("StepDecay", "initial_learning_rate", initial_learning_rate)
        checks.number("StepDecay", "factor", factor)
        checks.integer("StepDecay", "every_epochs", every_epochs, allow_none=True)
        if milestones is not None:
            if isinstance(milestones, str) or not hasattr(milestones, "__iter__"):
                raise TypeError(f"StepDecay: milestones must be a list of epochs, got {checks.shown(milestones)}.")
            for m in milestones:
                checks.integer("StepDecay", "each of milestones", m)
        if (every_epochs is None) == (milestones is None):
            raise ValueError("StepDecay needs exactly one of every_epochs and milestones, got "
                             f"every_epochs={every_epochs!r}, milestones={milestones!r}.")
        if every_epochs is not None and (int(every_epochs) != every_epochs or every_epochs < 1):
            raise ValueError(f"StepDecay every_epochs must be a positive integer, got {every_epochs!r}.")
        if milestones is not None:
            milestones = list(milestones)
            if not milestones or any(int(m) != m or m < 1 for m in milestones) or milestones != sorted(milestones):
                raise ValueError(f"StepDecay milestones must be increasing positive epochs, got {milestones!r}.")
            milestones = [int(m) for m in milestones]
        if factor <= 0:
            raise ValueError(f"StepDecay factor must be > 0, got {factor}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.every_epochs = None if every_epochs is None else int(every_epochs)
        self.milestones = milestones
        self.steps_per_epoch = steps_per_epoch
        self.factor = float(factor)

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        steps_per_epoch = tf.cast(self.steps_per_epoch, tf.int64)
        if self.milestones is None:
            period = tf.maximum(self.every_epochs * steps_per_epoch, 1)
            drops = tf.cast(step // period, tf.float32)
        else:
            boundaries = tf.constant(self.milestones, tf.int64) * steps_per_epoch
            drops = tf.reduce_sum(tf.cast(boundaries <= step, tf.float32))
        return self.initial_learning_rate * tf.pow(self.factor, drops)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "every_epochs": self.every_epochs,
            "steps_per_epoch": _as_int(self.steps_per_epoch),
            "factor": self.factor,
            "milestones": self.milestones,
        }


@keras.saving.register_keras_serializable(package="keras_graft")
class Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """lr_t = factor * schedule(t): one peer's share of a spread schedule (``PeerEnsemble.compile(lr_spread=True)``
    with a scheduled learning rate gives peer k the factor (1 + cos(pi * (N - k) / N)) / 2)."""

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        self.schedule = schedule
        self.factor = float(factor)

    def __call__(self, step):
        return self.factor * self.schedule(step)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule), "factor": self.factor}


SCHEDULES = {"cosine": CosineAnnealing, "step": StepDecay}


def schedule_factory(spec, epochs, steps_per_epoch):
    """A function initial_learning_rate -> LearningRateSchedule from a trainer's ``lr_schedule`` argument.

    ``spec`` is None (constant rate), "cosine" (anneal over the whole ``fit``), "step" (x0.1 every 60 epochs), a
    dict such as ``{"name": "step", "every_epochs": 30, "factor": 0.2}``, ``{"name": "step", "milestones": [11,
    15]}`` or ``{"name": "cosine", "alpha": 0.01}``,
    or a callable taking the initial learning rate and returning a schedule.
    """
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, keras.optimizers.schedules.LearningRateSchedule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or spec.get("name") not in SCHEDULES:
        raise ValueError(f"lr_schedule must be None, one of {sorted(SCHEDULES)}, a dict with 'name' among them, or "
                         f"a callable initial_learning_rate -> LearningRateSchedule; got {spec!r}.")
    options = {key: value for key, value in spec.items() if key != "name"}
    if spec["name"] == "cosine":
        CosineAnnealing(1.0, 1, 1, **options)  # Validates the options now rather than at the first fit.
        return lambda lr: CosineAnnealing(lr, epochs, steps_per_epoch, **options)
    if "milestones" not in options:
        options.setdefault("every_epochs", 60)
    StepDecay(1.0, steps_per_epoch=1, **options)
    return lambda lr: StepDecay(lr, steps_per_epoch=steps_per_epoch, **options)
