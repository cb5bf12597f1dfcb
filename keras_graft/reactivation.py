"""RePr: drop the most overlapping filters, train without them, bring them back orthogonal.

Prakash et al., "RePr: Improved Training of Convolutional Filters" (CVPR 2019). Training runs in cycles:

1. *full* (S1 epochs or steps): the whole network trains;
2. ranking: every filter of every convolution layer except the first gets RePr's inter-filter overlap score
   (depthwise convolutions are not ranked: each of their filters reads its own input channel, so two of them
   overlapping is no redundancy; SeparableConv ranks its pointwise filters). The filters of a layer, flattened
   to rows and normalised, form W (J rows); P = |W W^T - I| and score_f = sum_j P[f, j] / J
   (:func:`keras_graft.criteria.orthogonality`). The ``prune_ratio`` share of all ranked filters with the
   highest scores is dropped, globally across layers (``ranking="global"``, the paper) or within each layer
   (``ranking="layer"``), never every filter of one layer;
3. *pruned* (S2): the sub-network trains while the dropped filters are held at exactly zero;
4. re-initialisation: each dropped filter gets a new value orthogonal to the surviving filters of its layer and
   to the dropped filters' values from before the drop, and the next cycle starts.

After ``cycles`` cycles the network trains normally (phase *done*).

What "dropped" means here. A filter's output channel is silenced: the kernel filter, its bias and the scale and
offset (gamma, beta) of the normalisation layer that directly follows the convolution, if any, are zero. When the
filters drop, these weights and the optimizer's slots of all of them (momentum, Adam's moments, ...) are set to
zero; while they are dropped, a constraint on each of these weights multiplies it by its layer's 0/1 keep mask
after every optimizer update (Keras optimizers apply ``variable.constraint`` inside the compiled step), so the
forward and backward passes of every step see the filter at zero, whatever ``steps_per_execution``; the slots may
accumulate in between (nothing can move the weights they drive) and are zeroed again when the filters return.
Anything else that writes the weights between steps (a graft at an epoch's start) can bring a dropped filter back
until the next update ends. The moving statistics of the normalisation layer are not held (they follow the zero
channel). As in the paper, the next layer's weights that read the dropped channel are left alone: a channel that
is zero sends them no gradient (weight decay aside), so they keep their values for when the filter comes back.

Re-initialisation. With rows flattened like the kernel's filters (``d`` values each), the constraint matrix C
stacks the surviving rows and the dropped filters' pre-drop rows. A QR decomposition C^T = Q R gives an
orthonormal basis Q of C's rows; random Gaussian vectors with their Q components removed lie in C's null space,
and orthonormalised, they become the new filters, scaled to the root-mean-square row norm of a fresh draw
of the layer's kernel initializer (He normal, sqrt(2 / d) per value, when that draw is all zeros). With r rows
in C and k dropped filters, the null space is only sure to hold k directions when d >= r + k. Where it is not,
the new filters are orthogonal to the survivors only (level ``"survivors"``), and where even that does not fit,
they are a fresh draw of the initializer (level ``"initializer"``); each fallback is logged as a warning and
counted. The bias, gamma, beta and moving statistics of a re-initialised filter return to their layers' initial
values (gamma 1, beta 0, moving mean 0 and variance 1 for BatchNormalization: the paper's networks without
normalisation give no rule, and the re-implementations touch only the kernels), and its optimizer slots are zero.
Every draw of a re-initialisation comes from a generator seeded by (the state's seed, the cycle, the layer).

State. Everything the schedule needs lives in variables of a :class:`RePrState` attached to the model, so that
checkpoints of the model (``BackupAndRestore``, ``ModelCheckpoint``, ``save_weights``, ``tf.train.Checkpoint``)
carry it and a resumed run continues exactly; see :class:`RePr`.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import criteria as criteria_lib
from keras_graft import groups as groups_lib
from keras_graft import keras_internals
from keras_graft import layouts
from keras_graft.ensemble import PeerEnsemble
from keras_graft.keras_internals import optimizer_slots

__all__ = ["RePr", "RePrState", "PHASES", "LEVELS", "RANKINGS", "STATE_ATTRIBUTE", "phase_at", "select_filters",
           "orthogonal_directions", "optimizer_slots"]

#: Phase names; ``logs["repr_phase"]`` holds the index (0 full, 1 pruned, 2 done).
PHASES = ("full", "pruned", "done")
FULL, PRUNED, DONE = range(len(PHASES))
UNITS = ("epoch", "step")
#: How filters are ranked: over all ranked layers at once (the paper) or within each layer.
RANKINGS = ("global", "layer")
#: Re-initialisation levels, best first: orthogonal to survivors and pre-drop values, to survivors, none.
LEVELS = ("orthogonal", "survivors", "initializer")


def phase_at(unit, s1, s2, cycles):
    """(phase, 1-based cycle) of the 0-based epoch or step ``unit``: S1 full units, S2 pruned, ``cycles`` times."""
    cycle, within = divmod(unit, s1 + s2)
    if cycle >= cycles:
        return DONE, cycles
    return (FULL if within < s1 else PRUNED), cycle + 1


def select_filters(scores, prune_ratio, higher_is_better=False):
    """Indices of the filters to drop in each layer, ranked globally.

    ``scores`` holds one vector of per-filter scores per layer. The ``round(prune_ratio * total)`` filters (at
    least one) that rank worst across all layers are dropped (the highest scores, or the lowest where
    ``higher_is_better``), skipping any filter that would drop the last one of its layer. Ties keep layer order.
    """
    scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in scores]
    layer_of = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)])
    flat = np.concatenate(scores)
    badness = -flat if higher_is_better else flat
    budget = min(max(1, int(round(prune_ratio * flat.size))), sum(s.size - 1 for s in scores))
    chosen = [[] for _ in scores]
    offsets = np.cumsum([0] + [s.size for s in scores])
    taken = 0
    for position in np.argsort(-badness, kind="stable"):
        if taken == budget:
            break
        layer = layer_of[position]
        if len(chosen[layer]) < scores[layer].size - 1:
            chosen[layer].append(position - offsets[layer])
            taken += 1
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in chosen]


def orthogonal_directions(constraint_sets, count, dim, rng):
    """``count`` orthonormal vectors of length ``dim`` orthogonal to every row of the first usable constraint set.

    Tries each ``(rows, dim)`` matrix C of ``constraint_sets`` in turn; with r rows its null space has at least
    dim - r dimensions and is usable when that is ``count`` or more. A QR decomposition C^T = Q R gives an
    orthonormal basis Q of C's row space; Gaussian vectors projected off it (twice, against rounding), then
    orthonormalised, are uniformly random directions of the null space. Returns (vectors as rows, index of the
    set used), or (None, len(constraint_sets)) when none fits.
    """
    for level, constraints in enumerate(constraint_sets):
        if dim - constraints.shape[0] < count:
            continue
        vectors = rng.standard_normal((dim, count))
        if constraints.shape[0]:
            basis = np.linalg.qr(constraints.T)[0]
            for _ in range(2):
                vectors -= basis @ (basis.T @ vectors)
        return np.linalg.qr(vectors)[0].T, level
    return None, len(constraint_sets)


def _initializer(layer, variable):
    """The initializer ``layer`` made ``variable`` with: ``<name>_initializer`` (``pointwise_kernel`` reads
    ``pointwise_initializer``), zeros when the layer has none."""
    return getattr(layer, f"{variable.name.replace('_kernel', '')}_initializer", None) or "zeros"


def _initializer_draw(initializer, shape, rng):
    """A fresh value of ``initializer`` for ``shape`` as NumPy, seeded from ``rng`` when the initializer has a
    seed (so a RePr ``seed`` makes runs repeatable)."""
    initializer = keras.initializers.get(initializer)
    config = initializer.get_config()
    if "seed" in config:
        initializer = type(initializer).from_config(dict(config, seed=int(rng.integers(2**31 - 1))))
    return keras.ops.convert_to_numpy(initializer(tuple(shape), dtype="float32"))


class _LayerPlan:
    """One ranked convolution layer: its kernel and the weights that carry its filters.

    ``members`` pairs every float weight of the layer and of the normalisation layer that follows it with the
    weight's filter axes and the layer that owns it (from :func:`keras_graft.groups.graft_structure`).
    """

    def __init__(self, layer, members):
        self.layer = layer
        self.kernel, self.axes = layouts.primary_kernel(layer)
        self.num_filters = layouts.num_filters(layer)
        self.row_size = int(np.prod(self.kernel.shape)) // self.num_filters
        self.members = [(var, axes, owner) for var, axes, owner in members if axes is not None]

    @property
    def name(self):
        return self.layer.name


def _plans(model, criterion):
    """The ranked layers of ``model``: every convolution after the first, depthwise ones excepted."""
    convs = layouts.filter_layers(model)
    if len(convs) < 2:
        raise ValueError(f"RePr needs at least two convolution layers (the first is never pruned); model "
                         f"'{model.name}' has {len(convs)}.")
    weights = model.weights
    owners = {id(w): layer for layer in layouts.flatten_layers(model) for w in layer.weights}
    groups = {group.name: group for group in groups_lib.graft_structure(model).groups}
    plans = []
    for layer in convs[1:]:
        if layouts.layout(layer).depthwise:
            continue
        members = [(weights[i], axes, owners[id(weights[i])]) for i, axes in groups[layer.name].members]
        plan = _LayerPlan(layer, members)
        scores = criterion(plan.kernel.value, per_filter=True, filter_axes=plan.axes)
        if tuple(scores.shape) != (plan.num_filters,):
            raise ValueError(f"Criterion '{criterion.name}' does not rank filters: for layer '{layer.name}' "
                             f"with {plan.num_filters} filters it returned shape {tuple(scores.shape)}.")
        plans.append(plan)
    if all(plan.num_filters < 2 for plan in plans):
        raise ValueError(f"RePr cannot drop any filter of model '{model.name}': no convolution layer after the "
                         "first (depthwise ones aside) has two filters or more.")
    return plans


#: Attribute of a model that holds its :class:`RePrState`.
STATE_ATTRIBUTE = "_keras_graft_repr_state"


class RePrState(keras.layers.Layer):
    """RePr's state for one model, as non-trainable variables that checkpoints of the model carry.

    ``units_done`` counts the epochs (or steps) RePr has begun for the model, ``fallbacks`` the re-initialised
    layers that fell back, ``seed`` seeds every re-initialisation (so a resumed run draws the same values), and
    for each ranked layer ``keep_<i>`` (1 for a filter in use, 0 for a dropped one; the masks that hold dropped
    filters at zero) and ``pre_drop_<i>`` (the dropped filters' kernel rows from before the drop, one row per
    filter, zero for the others: the re-initialisation is orthogonal to them).

    :meth:`RePr.state_for` creates it and attaches it to the model as the attribute ``_keras_graft_repr_state``
    without adding it to ``model.layers`` or ``model.weights``; Keras' weight files (``model.save_weights``,
    ``keras.callbacks.BackupAndRestore``, ``ModelCheckpoint``, ``model.save``) save it with the model's own
    weights, and ``tf.train.Checkpoint`` tracks it as a dependency of the model (GraftTrainer's ``backup_dir``).
    A file saved with the state loads into a model without one (the state's entries are ignored).
    """

    def __init__(self, plans, seed, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.layer_names = [plan.name for plan in plans]
        self.units_done = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                          name="units_done")
        self.fallbacks = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False,
                                         name="fallbacks")
        self.seed = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False, name="seed")
        self.seed.assign(int(seed))
        # One attribute per variable: tf.train.Checkpoint tracks attributes, not the variables of a Python list.
        for i, plan in enumerate(plans):
            setattr(self, f"keep_{i}", self.add_weight(shape=(plan.num_filters,), dtype="float32",
                                                       initializer="ones", trainable=False, name=f"keep_{i}"))
            setattr(self, f"pre_drop_{i}", self.add_weight(shape=(plan.num_filters, plan.row_size),
                                                           dtype="float32", initializer="zeros", trainable=False,
                                                           name=f"pre_drop_{i}"))
        self.built = True

    @property
    def keep(self):
        """Per ranked layer, its keep mask (1 in use, 0 dropped)."""
        return [getattr(self, f"keep_{i}") for i in range(len(self.layer_names))]

    @property
    def pre_drop(self):
        """Per ranked layer, the kernel rows of its dropped filters from before the drop (zero elsewhere)."""
        return [getattr(self, f"pre_drop_{i}") for i in range(len(self.layer_names))]

    def matches(self, plans):
        return self.layer_names == [plan.name for plan in plans] and all(
            tuple(keep.shape) == (plan.num_filters,) for keep, plan in zip(self.keep, plans))

    def dropped(self):
        """{plan index: indices of the filters held at zero} for the layers that have any."""
        dropped = {}
        for i, keep in enumerate(self.keep):
            indices = np.flatnonzero(keep.numpy() == 0.0)
            if indices.size:
                dropped[i] = indices
        return dropped

    def call(self, inputs):
        return inputs


class _Hold(keras.constraints.Constraint):
    """Multiplies a weight by its layer's keep mask along the filter axes, after any constraint it had before.

    Keras optimizers apply ``variable.constraint`` after every update, inside the compiled training step, so a
    dropped filter is zero at every step, whatever ``steps_per_execution``."""

    def __init__(self, keep, shape, previous=None):
        self.keep = keep
        self.shape = shape
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return w * keras.ops.cast(keras.ops.reshape(self.keep.value, self.shape), w.dtype)


class _ModelState:
    """What the callback keeps in Python about one model: its plans, its :class:`RePrState`, its optimizer."""

    def __init__(self, model, plans, variables, index):
        self.model = model
        self.plans = plans
        self.variables = variables
        self.index = index
        self.optimizer = None
        self.begun = None  # index of the batch whose training call began (step unit)
        self.checked = False
        self._clear = None

    @property
    def units_done(self):
        return int(self.variables.units_done.numpy())

    def use_optimizer(self, optimizer):
        if optimizer is not self.optimizer:
            self.optimizer, self._clear = optimizer, None

    def clear(self):
        """Multiplies every weight that carries ranked filters, and its optimizer slots, by its keep mask: one
        compiled call, traced once per optimizer (the masks are variables)."""
        if self._clear is None:
            targets = []
            for plan, keep in zip(self.plans, self.variables.keep):
                for var, axes, _ in plan.members:
                    if var.trainable:
                        shape = layouts.filter_shape(var.shape, axes)
                        slots = optimizer_slots(self.optimizer, var) if self.optimizer is not None else []
                        targets += [(v, keep, shape) for v in [var] + slots]

            def clear():
                for variable, keep, shape in targets:
                    variable.assign(variable.value * tf.cast(tf.reshape(keep.value, shape), variable.dtype))

            self._clear = tf.function(clear, autograph=False)
        self._clear()


class RePr(keras.callbacks.Callback):
    """RePr training schedule (Prakash et al., CVPR 2019) as a Keras callback; see the module docstring.

    ``model.fit(x, y, epochs=110, callbacks=[RePr()])``. Each model has its own schedule, which counts the epochs
    or steps begun under RePr and continues across ``fit`` calls. A custom loop either calls ``set_model(model)``
    and then ``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_begin``, ``on_train_batch_end`` and
    ``on_epoch_end`` for each of its models, or, training several models in one step, sets :attr:`models` (and
    :attr:`optimizers` where a model's optimizer is not ``model.optimizer``) and calls the hooks once.

    When things happen: the drop and the re-initialisation due after epoch e happen when epoch e + 1 begins (with
    ``unit="step"``, before the training call that follows the step), so epoch e's validation, ``ModelCheckpoint``
    and ``BackupAndRestore`` see the weights before them, and a run resumed from a backup makes them exactly once.
    With ``steps_per_execution`` k > 1 (``compile`` or GraftTrainer) the hold is unaffected (it runs inside the
    compiled step), and step-unit events happen at the first call boundary at or after their step.

    State: the schedule's counter, the masks of dropped filters, their pre-drop values and the re-initialisation
    seed are variables of a :class:`RePrState` attached to each model (created when the callback first sees the
    model: ``set_model``, setting :attr:`models`, or ``on_train_begin``; an existing one is reused, so the state
    belongs to the model). Every checkpoint of the model carries them: ``keras.callbacks.BackupAndRestore`` (in
    any position of the callback list), ``ModelCheckpoint``, ``model.save_weights`` and GraftTrainer's
    ``backup_dir`` (its ``tf.train.Checkpoint`` tracks the models; a state attached after the restore, when the
    trainer hands the callback its models, is restored as it is attached); a run restored from one continues the
    schedule exactly where the backup left it. Attaching
    also sets each weight's ``constraint`` to hold its dropped filters at zero (composed with any constraint it
    had) and rebuilds ``model.train_function`` if ``fit`` made one, so that the step traces the hold; a training
    function compiled before the callback saw the model would miss it, which the callback detects at the first
    step after a drop and reports as an error.

    Adds to the epoch logs (put it before CSVLogger or TensorBoard): ``repr_phase`` (0 full, 1 pruned, 2 done)
    and ``repr_cycle`` (1-based) of the epoch's last unit, ``repr_dropped`` (filters held at zero in it) and
    ``repr_fallbacks`` (re-initialised layers that fell back so far); with several :attr:`models`, one set per
    model suffixed ``_0``, ``_1``, ... :attr:`history` lists every drop and re-initialisation of this callback
    object with per-layer counts and indices, for plotting.

    Defaults: S1 = 20, S2 = 10 epochs, p = 0.3, N = 3 cycles, the settings of the public re-implementation
    siahuat0727/RePr (``run.sh.example``: ``--S1 20 --S2 10``, prune ratio 0.3, and 110 epochs for RePr: drops after
    epochs 20, 50 and 80, re-initialisations after 30, 60 and 90), the protocol under which the paper's 3-layer
    ConvNet went from 72.1 to 76.4 % on CIFAR-10 (its Figure 1, as that re-implementation quotes it); the paper
    gives no code. Train for at least ``cycles * (s1 + s2) + s1`` units (110 epochs
    with the defaults), so that S1 units of normal training follow the last re-initialisation; the callback warns
    when ``fit`` is given fewer epochs. The re-initialised filters also need a learning rate that is still large:
    with cosine annealing to zero, the last re-initialisation should come well before the end (in the accuracy
    study's 12-epoch cosine run the third cycle, re-initialised after epoch 9 at 15 % of the initial rate, cost 3
    of the 7 validation points lost; see BENCHMARKS.md, section "RePr"). RePr is a regulariser: it pays off, if
    at all, where the network overfits, not where it underfits.

    Args:
      s1: units of full training before each drop.
      s2: units of training without the dropped filters.
      prune_ratio: share of the ranked filters dropped per cycle, in (0, 1).
      cycles: number of drop/re-initialise cycles; afterwards training continues normally.
      criterion: how filters rank: ``"orthogonality"`` (RePr; drop the highest overlap), ``"l1"`` (the paper's
        weight-magnitude ablation; drop the smallest norms), or any per-filter kernel criterion.
      unit: ``"epoch"`` or ``"step"``: what s1 and s2 count.
      ranking: ``"global"`` (the paper: one ranking over all ranked layers) or ``"layer"`` (``prune_ratio`` of
        every layer). The overlap score of random filters grows as their rows get shorter (about
        sqrt(2 / (pi d)) for d values per filter), so on networks whose layers differ in filter size the global
        ranking drops mostly from the layers with the shortest rows: on a freshly initialised ResNet-8 of width
        8 it drops 7 of the 8 filters of one layer and 14 of 16 of another, and none of the widest layer.
      verbose: 1 prints one line per drop and per re-initialisation through Keras' printing (stdout, or absl
        logging after ``keras.config.disable_interactive_logging()``).
      seed: seeds the re-initialised values (with the cycle and the layer, so a resumed run repeats them).
        None: a random seed, drawn once per model and kept in its state.
    """

    def __init__(self, s1=20, s2=10, prune_ratio=0.3, cycles=3, criterion="orthogonality", unit="epoch",
                 ranking="global", verbose=0, seed=None):
        super().__init__()
        for name, value in (("s1", s1), ("s2", s2), ("cycles", cycles)):
            if not isinstance(value, (numbers.Real, np.integer)):
                raise TypeError(f"RePr: {name} must be a positive integer, got {checks.shown(value)}.")
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RePr {name} must be a positive integer, got {name}={value!r}.")
        checks.number("RePr", "prune_ratio", prune_ratio)
        if not 0.0 < prune_ratio < 1.0:
            raise ValueError(f"RePr prune_ratio must lie in (0, 1), got prune_ratio={prune_ratio!r}.")
        if unit not in UNITS:
            raise ValueError(f"Unknown RePr unit {unit!r}. Valid units: {list(UNITS)}.")
        if ranking not in RANKINGS:
            raise ValueError(f"Unknown RePr ranking '{ranking}'. Valid rankings: {list(RANKINGS)}.")
        verbose = checks.verbose("RePr", verbose)
        seed = checks.integer("RePr", "seed", seed, minimum=0, allow_none=True)
        self.criterion = criteria_lib.get(criterion)
        if self.criterion.reads_gamma:
            raise ValueError(f"Criterion '{self.criterion.name}' reads normalisation layers, not kernels; RePr ranks "
                             "the filters of convolution kernels. Use 'orthogonality' or 'l1'.")
        self.s1, self.s2, self.cycles = int(s1), int(s2), int(cycles)
        self.prune_ratio = float(prune_ratio)
        self.unit = unit
        self.ranking = ranking
        self.verbose = verbose
        self.seed = seed
        self._models = None
        #: Their optimizers, aligned with ``models``; None: each model's ``model.optimizer``.
        self.optimizers = None
        self._states = {}
        self._events = []

    def get_config(self):
        return {
            "s1": self.s1,
            "s2": self.s2,
            "prune_ratio": self.prune_ratio,
            "cycles": self.cycles,
            "criterion": criteria_lib.serialize(self.criterion),
            "unit": self.unit,
            "ranking": self.ranking,
            "verbose": self.verbose,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config, criterion=criteria_lib.get(config["criterion"])))

    @property
    def total_units(self):
        """Units the schedule spans with S1 units of normal training after the last re-initialisation."""
        return self.cycles * (self.s1 + self.s2) + self.s1

    # -- state per model ---------------------------------------------------------------------------------------

    @property
    def models(self):
        """Models to act on in every hook instead of ``self.model`` (set by a trainer of several models).
        Setting them attaches each model's state (see the class docstring)."""
        return self._models

    @models.setter
    def models(self, models):
        self._models = None if models is None else list(models)
        for model in self._models or []:
            if getattr(model, "built", False) and model.weights:
                self.state_for(model)

    def set_model(self, model):
        super().set_model(model)
        if self._models is not None:
            return
        # A PeerEnsemble's peers each have their own state (see _targets); the ensemble itself has none.
        for target in model.peers if isinstance(model, PeerEnsemble) else [model]:
            if getattr(target, "built", False) and target.weights:
                self.state_for(target)

    def _targets(self):
        """[(model, optimizer)] the hooks act on."""
        models, optimizers = self._models, self.optimizers
        if models is None and isinstance(self.model, PeerEnsemble) and self.model.peer_optimizers:
            models, optimizers = self.model.peers, self.model.peer_optimizers  # each peer its own schedule
        models = models if models is not None else [self.model]
        if optimizers is None:
            optimizers = [getattr(model, "optimizer", None) for model in models]
        if len(optimizers) != len(models):
            raise ValueError(f"RePr has {len(models)} models but {len(optimizers)} optimizers.")
        return list(zip(models, optimizers))

    def state_for(self, model):
        """The :class:`RePrState` of ``model``: the one attached to it, or a new one attached now."""
        return self._model_state(model).variables

    def _model_state(self, model):
        state = self._states.get(id(model))
        if state is not None and state.model is model:
            return state
        if not model.built or not model.weights:
            raise ValueError(f"Model '{model.name}' is not built: build it (call it on data or give it an Input) "
                             "before training with RePr.")
        plans = _plans(model, self.criterion)
        variables = getattr(model, STATE_ATTRIBUTE, None)
        if variables is None or not variables.matches(plans):
            seed = self.seed
            if seed is None:
                seed = int(np.random.SeedSequence().generate_state(1)[0])
            seed = int(np.random.SeedSequence([int(seed), len(self._states)]).generate_state(1)[0])
            strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
            with strategy.scope():
                variables = RePrState(plans, seed, name=f"repr_state_{model.name}")
            keras_internals.attach_state(model, STATE_ATTRIBUTE, variables)
        for plan, keep in zip(plans, variables.keep):
            for var, axes, _ in plan.members:
                if var.trainable and not (isinstance(var.constraint, _Hold) and var.constraint.keep is keep):
                    previous = var.constraint.previous if isinstance(var.constraint, _Hold) else var.constraint
                    var.constraint = _Hold(keep, layouts.filter_shape(var.shape, axes), previous)
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)  # a new step, traced with the hold at its first call
        state = _ModelState(model, plans, variables, len(self._states))
        self._states[id(model)] = state
        return state

    def _state(self, model, optimizer):
        state = self._model_state(model)
        state.use_optimizer(optimizer)
        return state

    @staticmethod
    def _check_model(model, optimizer):
        if not model.built or not model.weights:
            raise ValueError(f"Model '{model.name}' is not built: build it (call it on data or give it an Input) "
                             "before training with RePr.")
        if optimizer is None:
            raise ValueError(f"Model '{model.name}' has no optimizer: RePr clears the optimizer slots of dropped "
                             "filters and finds them through model.optimizer (compile the model) or the "
                             "callback's optimizers.")

    def state_of(self, model=None):
        """(phase name, 1-based cycle, filters dropped now) of ``model`` (default: the first of :attr:`models`, or
        the callback's model), read from the model's state: the phase of the last unit begun."""
        if model is None:
            model = self._models[0] if self._models else self.model
        variables = getattr(model, STATE_ATTRIBUTE, None)
        if variables is None:
            return PHASES[FULL], 1, 0
        units = int(variables.units_done.numpy())
        phase, cycle = phase_at(max(units - 1, 0), self.s1, self.s2, self.cycles)
        dropped = sum(len(i) for i in variables.dropped().values()) if phase == PRUNED else 0
        return PHASES[phase], cycle, dropped

    @property
    def history(self):
        """Every drop and re-initialisation, oldest first: dicts with ``event`` ("drop" or "reinit"), ``model``
        (its name), ``cycle``, ``unit`` (the epoch or step the next phase starts at), per-layer ``dropped`` counts
        and filter ``indices`` (drop), per-layer ``reinitialised`` counts and ``levels`` (reinit)."""
        return list(self._events)

    # -- Keras hooks -------------------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        for model, optimizer in self._targets():
            self._check_model(model, optimizer)
            state = self._state(model, optimizer)
            state.begun, state.checked = None, False
        epochs = (self.params or {}).get("epochs")
        if self.unit == "epoch" and epochs is not None and int(epochs) < self.total_units:
            logging.warning("RePr: %d epochs leave %d epochs of normal training after the last re-initialisation "
                            "(S1 = %d, S2 = %d, %d cycles); train for %d epochs so that S1 epochs follow it.",
                            epochs, max(int(epochs) - self.cycles * (self.s1 + self.s2), 0), self.s1, self.s2,
                            self.cycles, self.total_units)

    def on_epoch_begin(self, epoch, logs=None):
        for target in self._targets():
            state = self._state(*target)
            state.begun = None
            if self.unit == "epoch":
                self._transition(state)
                state.variables.units_done.assign_add(1)

    def on_train_batch_begin(self, batch, logs=None):
        if self.unit == "step":
            for target in self._targets():
                self._begin_step(self._state(*target), batch)

    def _begin_step(self, state, batch):
        self._transition(state)
        state.variables.units_done.assign_add(1)
        state.begun = int(batch)

    def on_train_batch_end(self, batch, logs=None):
        for target in self._targets():
            state = self._state(*target)
            if self.unit == "step":
                if state.begun is None:  # a loop that does not call on_train_batch_begin: one step per call
                    self._begin_step(state, batch)
                # With steps_per_execution k, Keras and GraftTrainer pass the call's first and last step indices.
                state.variables.units_done.assign_add(max(int(batch) - state.begun, 0))
                state.begun = None
            if not state.checked:
                self._check_hold(state)

    def on_epoch_end(self, epoch, logs=None):
        targets = self._targets()
        for k, target in enumerate(targets):
            state = self._state(*target)
            phase, cycle, dropped = self.state_of(state.model)
            if logs is not None:
                suffix = "" if len(targets) == 1 else f"_{k}"
                logs.update({f"repr_phase{suffix}": PHASES.index(phase), f"repr_cycle{suffix}": cycle,
                             f"repr_dropped{suffix}": dropped,
                             f"repr_fallbacks{suffix}": int(state.variables.fallbacks.numpy())})

    # -- schedule ----------------------------------------------------------------------------------------------

    def _transition(self, state):
        """Drops filters when the next unit is the first of S2, re-initialises them when S2 has ended: the masks in
        the state say which phase the weights are in, the counter which phase the next unit belongs to."""
        units = state.units_done
        phase, cycle = phase_at(units, self.s1, self.s2, self.cycles)
        dropped = state.variables.dropped()
        if phase == PRUNED and not dropped:
            self._drop(state, cycle, units)
        elif phase != PRUNED and dropped:
            self._reinitialise(state, phase_at(max(units - 1, 0), self.s1, self.s2, self.cycles)[1], units)

    def _check_hold(self, state):
        """After the first training call of a pruned phase: the dropped filters must still be zero."""
        dropped = state.variables.dropped()
        if not dropped:
            return
        state.checked = True
        i, indices = next(iter(dropped.items()))
        plan = state.plans[i]
        if any(np.any(layouts.to_rows(var.numpy(), axes)[indices]) for var, axes, _ in plan.members if var.trainable):
            raise RuntimeError(
                f"RePr: the dropped filters of layer '{plan.name}' of model '{state.model.name}' changed during "
                "training: the training step was compiled before RePr set the constraints that hold them at zero. "
                "Give the callback the model before its first training step (fit compiles a new step when RePr "
                "sees the model in set_model; a custom loop must trace its step after setting RePr.models).")

    def _rng(self, state, cycle, plan_index):
        """The generator of one layer's re-initialisation: a function of the state's seed, the cycle and the layer,
        so that a resumed run draws what the uninterrupted one drew."""
        return np.random.default_rng([int(state.variables.seed.numpy()), int(cycle), int(plan_index)])

    def _drop(self, state, cycle, unit):
        """Ranks the filters, records the dropped ones' values and zeroes them with their optimizer slots."""
        scores = [self.criterion(p.kernel.value, per_filter=True, filter_axes=p.axes).numpy() for p in state.plans]
        if self.ranking == "layer":
            chosen = [select_filters([s], self.prune_ratio, self.criterion.higher_is_better)[0]
                      if s.size > 1 else np.zeros(0, np.int64) for s in scores]
        else:
            chosen = select_filters(scores, self.prune_ratio, self.criterion.higher_is_better)
        dropped = {i: idx for i, idx in enumerate(chosen) if idx.size}
        for i, plan in enumerate(state.plans):
            keep = np.ones(plan.num_filters, np.float32)
            pre_drop = np.zeros((plan.num_filters, plan.row_size), np.float32)
            if i in dropped:
                keep[dropped[i]] = 0.0
                pre_drop[dropped[i]] = layouts.to_rows(plan.kernel.numpy(), plan.axes)[dropped[i]]
            state.variables.keep[i].assign(keep)
            state.variables.pre_drop[i].assign(pre_drop)
        state.clear()
        state.checked = False
        event = {
            "event": "drop", "model": state.model.name, "cycle": cycle, "unit": unit,
            "dropped": {state.plans[i].name: int(idx.size) for i, idx in dropped.items()},
            "indices": {state.plans[i].name: idx.tolist() for i, idx in dropped.items()},
        }
        self._events.append(event)
        if self.verbose:
            keras_internals.print_msg(f"RePr '{state.model.name}' cycle {cycle}: dropped "
                                      f"{sum(event['dropped'].values())} filters after {unit} {self.unit}s "
                                      f"{event['dropped']}")

    def _reinitialise(self, state, cycle, unit):
        """Gives the dropped filters new values orthogonal to the survivors and to their pre-drop values.

        Each layer reaches a level of :data:`LEVELS`; levels other than ``"orthogonal"`` count as fallbacks.
        """
        state.clear()  # the dropped filters and their slots are zero before their new values arrive
        dropped = state.variables.dropped()
        levels = {}
        for i, indices in dropped.items():
            plan = state.plans[i]
            rng = self._rng(state, cycle, i)
            pre_drop = state.variables.pre_drop[i].numpy()[indices].astype(np.float64)
            levels[plan.name] = self._reinitialise_layer(plan, indices, pre_drop, rng)
            for var, axes, owner in plan.members:
                if var is not plan.kernel:
                    self._reset_to_initializer(var, axes, owner, indices, rng)
        for i, plan in enumerate(state.plans):
            state.variables.keep[i].assign(np.ones(plan.num_filters, np.float32))
            state.variables.pre_drop[i].assign(np.zeros((plan.num_filters, plan.row_size), np.float32))
        fallbacks = {name: level for name, level in levels.items() if level != LEVELS[0]}
        state.variables.fallbacks.assign_add(len(fallbacks))
        for name, level in fallbacks.items():
            logging.warning("RePr %s cycle %d: layer '%s' has too few values per filter for a null space orthogonal "
                            "to all %s; its re-initialised filters are %s.", state.model.name, cycle, name,
                            "surviving and pre-drop filters" if level == LEVELS[1] else "surviving filters",
                            "orthogonal to the surviving filters only" if level == LEVELS[1]
                            else "a fresh draw of the layer's initializer")
        self._events.append({
            "event": "reinit", "model": state.model.name, "cycle": cycle, "unit": unit,
            "reinitialised": {state.plans[i].name: int(idx.size) for i, idx in dropped.items()},
            "levels": levels,
        })
        if self.verbose:
            keras_internals.print_msg(f"RePr '{state.model.name}' cycle {cycle}: re-initialised "
                                      f"{sum(len(i) for i in dropped.values())} filters after {unit} {self.unit}s "
                                      f"{levels}")

    @staticmethod
    def _reinitialise_layer(plan, dropped, pre_drop, rng):
        """Writes the new kernel rows of one layer's ``dropped`` filters; returns the level reached."""
        kernel = plan.kernel.numpy()
        rows = layouts.to_rows(kernel, plan.axes).astype(np.float64)
        fresh = layouts.to_rows(_initializer_draw(_initializer(plan.layer, plan.kernel), kernel.shape, rng), plan.axes)
        if not np.any(fresh):
            fresh = rng.normal(0.0, math.sqrt(2.0 / rows.shape[1]), fresh.shape)
        survivors = np.delete(rows, dropped, axis=0)
        directions, level = orthogonal_directions([np.concatenate([survivors, pre_drop]), survivors],
                                                  dropped.size, rows.shape[1], rng)
        if directions is None:
            rows[dropped] = fresh[dropped]
        else:
            rows[dropped] = directions * np.sqrt(np.mean(np.sum(np.square(fresh), axis=1)))
        plan.kernel.assign(layouts.from_rows(rows, kernel.shape, plan.axes).astype(kernel.dtype))
        return LEVELS[level]

    @staticmethod
    def _reset_to_initializer(var, axes, owner, dropped, rng):
        """Sets the dropped filters' entries of ``var`` (a bias, gamma, beta, moving statistic) to their initial
        values, drawn from the initializer ``owner`` made it with."""
        value = var.numpy()
        shape = layouts.filter_shape(value.shape, axes)
        selected = np.zeros(int(np.prod(shape)), bool)
        selected[dropped] = True
        initial = _initializer_draw(_initializer(owner, var), value.shape, rng)
        var.assign(np.where(selected.reshape(shape), initial, value).astype(value.dtype))
