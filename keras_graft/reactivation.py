"""RePr: drop the most overlapping filters, train without them, bring them back orthogonal.

Prakash et al., "RePr: Improved Training of Convolutional Filters" (CVPR 2019). Training runs in cycles:

1. *full* (S1 epochs or steps): the whole network trains;
2. ranking: every filter of every convolution layer except the first gets RePr's inter-filter overlap score
   (depthwise convolutions are not ranked: each of their filters reads its own input channel, so two of them
   overlapping is no redundancy; SeparableConv ranks its pointwise filters). The filters of a layer, flattened
   to rows and normalised, form W (J rows); P = |W W^T - I| and score_f = sum_j P[f, j] / J
   (:func:`keras_graft.criteria.orthogonality`). The ``prune_ratio`` share of all ranked filters with the
   highest scores is dropped, globally across layers, never every filter of one layer;
3. *pruned* (S2): the sub-network trains while the dropped filters are held at exactly zero;
4. re-initialisation: each dropped filter gets a new value orthogonal to the surviving filters of its layer and
   to the dropped filters' values from before the drop, and the next cycle starts.

After ``cycles`` cycles the network trains normally (phase *done*).

What "dropped" means here. A filter's output channel is silenced: the kernel filter, its bias and the scale and
offset (gamma, beta) of the normalisation layer that directly follows the convolution, if any, are zero, and so
are the optimizer's slots of all of these (momentum, Adam's first and second moments, ...), so that nothing can
revive them. A compiled function multiplies these variables by a per-layer 0/1 mask after every training step
(so the model must run one step per callback call, ``steps_per_execution=1``): the step's forward and backward
passes always see the filter at zero. Anything else that writes the weights between steps (a graft at an epoch's
end) can bring a dropped filter back until the next step ends. As in the paper, the next layer's weights that
read the dropped channel are left alone: a channel that is zero sends them no gradient (weight decay aside), so
they keep their values for when the filter comes back.

Re-initialisation. With rows flattened like the kernel's filters (``d`` values each), the constraint matrix C
stacks the surviving rows and the dropped filters' pre-drop rows. A QR decomposition C^T = Q R gives an
orthonormal basis Q of C's rows; random Gaussian vectors with their Q components removed lie in C's null space,
and orthonormalised, they become the new filters, scaled to the root-mean-square row norm of a fresh draw
of the layer's kernel initializer (He normal, sqrt(2 / d) per value, when that draw is all zeros). With r rows
in C and k dropped filters, the null space is only sure to hold k directions when d >= r + k. Where it is not,
the new filters are orthogonal to the survivors only (level ``"survivors"``), and where even that does not fit,
they are a fresh draw of the initializer (level ``"initializer"``); each fallback is logged as a warning and
counted. The bias, gamma, beta and moving statistics of a re-initialised filter return to their layers' initial
values, and its optimizer slots stay zero.
"""

import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import criteria as criteria_lib
from keras_graft import groups as groups_lib
from keras_graft import layouts
from keras_graft.ensemble import PeerEnsemble

__all__ = ["RePr", "PHASES", "LEVELS", "phase_at", "select_filters", "orthogonal_directions", "optimizer_slots",
           "to_rows", "from_rows"]

#: Phase names; ``logs["repr_phase"]`` holds the index (0 full, 1 pruned, 2 done).
PHASES = ("full", "pruned", "done")
FULL, PRUNED, DONE = range(len(PHASES))
UNITS = ("epoch", "step")
#: Re-initialisation levels, best first: orthogonal to survivors and pre-drop values, to survivors, none.
LEVELS = ("orthogonal", "survivors", "initializer")
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


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


def to_rows(array, axes):
    """NumPy twin of :func:`keras_graft.criteria.filter_rows`: one row per filter, ``(filters, values)``."""
    axes = layouts.normalize_axes(axes, array.ndim)
    moved = np.moveaxis(array, axes, range(array.ndim - len(axes), array.ndim))
    return moved.reshape(-1, int(np.prod([array.shape[a] for a in axes]))).T


def from_rows(rows, shape, axes):
    """Inverse of :func:`to_rows`."""
    axes = layouts.normalize_axes(axes, len(shape))
    other = [shape[i] for i in range(len(shape)) if i not in axes]
    moved = rows.T.reshape(other + [shape[a] for a in axes])
    return np.moveaxis(moved, range(len(shape) - len(axes), len(shape)), axes)


def _filter_shape(shape, axes):
    """Shape that broadcasts a per-filter vector against a variable of ``shape`` along ``axes``."""
    axes = layouts.normalize_axes(axes, len(shape))
    return [shape[i] if i in axes else 1 for i in range(len(shape))]


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


def optimizer_slots(optimizer, variable):
    """The optimizer's own variables for ``variable``: momentum, Adam's m and v, accumulators, EMA, ...

    Keras 3 optimizers keep each kind of slot in a list aligned with the variables they were built for
    (``SGD.momentums``, ``Adam._momentums`` and ``._velocities``, ...). Every such list of the optimizer (or of
    the optimizer a LossScaleOptimizer wraps) contributes the entry at ``variable``'s index. Slots shaped
    differently from their variable (Adafactor's factored moments) are not found.
    """
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    trainable = list(getattr(optimizer, "_trainable_variables", []))
    if not trainable:
        return []
    index = optimizer._get_variable_index(variable)

    def aligned(value):
        if not isinstance(value, (list, tuple)) or len(value) != len(trainable) or value is trainable:
            return False
        pairs = [(slot, var) for slot, var in zip(value, trainable) if slot is not None]
        return bool(pairs) and all(isinstance(slot, keras.Variable) and slot is not var
                                   and tuple(slot.shape) == tuple(var.shape) for slot, var in pairs)

    slot_lists = [value for value in vars(optimizer).values() if aligned(value)]
    return [slots[index] for slots in slot_lists if slots[index] is not None]


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
        self.num_filters = int(np.prod([self.kernel.shape[a] for a in layouts.normalize_axes(
            self.axes, len(self.kernel.shape))]))
        self.members = [(var, axes, owner) for var, axes, owner in members if axes is not None]

    @property
    def name(self):
        return self.layer.name


class _ModelState:
    """RePr's schedule and dropped filters for one model trained by ``optimizer``."""

    def __init__(self, model, optimizer, plans):
        self.model = model
        self.optimizer = optimizer
        self.plans = plans
        self.units_done = 0
        self.dropped = {}  # plan index -> indices of the filters dropped in the latest cycle
        self.pre_drop = {}  # plan index -> pre-drop rows of the dropped filters
        self.fallbacks = 0
        self._hold = None

    @property
    def dropped_count(self):
        return int(sum(len(i) for i in self.dropped.values()))

    def drop(self, dropped):
        """Holds the filters ``dropped`` ({plan index: filter indices}) at zero from the next :meth:`hold` on."""
        self.dropped = dropped
        self._hold = None

    def use_optimizer(self, optimizer):
        """Follows a new optimizer (a recompiled model): the next hold clears its slots."""
        if optimizer is not self.optimizer:
            self.optimizer, self._hold = optimizer, None

    def hold(self):
        """Zeroes the dropped filters' weights and optimizer slots: one compiled call, traced once per drop."""
        if self._hold is None:
            self._hold = self._hold_function()
        self._hold()

    def _hold_function(self):
        """A tf.function multiplying each weight that carries dropped filters, and its optimizer slots, by a
        0/1 mask along its filter axes."""
        targets = []
        for i, dropped in self.dropped.items():
            plan = self.plans[i]
            keep = np.ones(plan.num_filters, np.float32)
            keep[dropped] = 0.0
            for var, axes, _ in plan.members:
                if var.trainable:
                    mask = keep.reshape(_filter_shape(var.shape, axes))
                    targets += [(v, mask) for v in [var] + optimizer_slots(self.optimizer, var)]

        def hold():
            for variable, mask in targets:
                variable.assign(variable.value * tf.constant(mask, variable.dtype))

        return tf.function(hold, autograph=False)


class RePr(keras.callbacks.Callback):
    """RePr training schedule (Prakash et al., CVPR 2019) as a Keras callback; see the module docstring.

    ``model.fit(x, y, epochs=..., callbacks=[RePr(s1=20, s2=10)])``. Each model has its own schedule, which
    counts the epochs or steps this callback has seen for it and continues across ``fit`` calls. A custom loop
    either calls ``set_model(model)`` and then ``on_train_begin``, ``on_train_batch_end`` and ``on_epoch_end``
    for each of its models, or, training several models in one step, sets :attr:`models` (and
    :attr:`optimizers` where a model's optimizer is not ``model.optimizer``) and calls the hooks once.

    Adds to the epoch logs (put it before CSVLogger or TensorBoard): ``repr_phase`` (0 full, 1 pruned, 2 done)
    and ``repr_cycle`` (1-based) of the epoch's last unit, ``repr_dropped`` (filters held at zero in it) and
    ``repr_fallbacks`` (re-initialised layers that fell back so far); with several :attr:`models`, one set per
    model suffixed ``_0``, ``_1``, ... :attr:`history` lists every drop and re-initialisation with per-layer
    counts and indices, for plotting.

    Args:
      s1: units of full training before each drop.
      s2: units of training without the dropped filters.
      prune_ratio: share of the ranked filters dropped per cycle, in (0, 1).
      cycles: number of drop/re-initialise cycles; afterwards training continues normally.
      criterion: how filters rank: ``"orthogonality"`` (RePr; drop the highest overlap), ``"l1"`` (the paper's
        weight-magnitude ablation; drop the smallest norms), or any per-filter kernel criterion.
      unit: ``"epoch"`` or ``"step"``: what s1 and s2 count.
      verbose: 1 logs each drop and re-initialisation.
      seed: seeds the re-initialised values.
    """

    def __init__(self, s1, s2, prune_ratio=0.3, cycles=3, criterion="orthogonality", unit="epoch", verbose=0,
                 seed=None):
        super().__init__()
        for name, value in (("s1", s1), ("s2", s2), ("cycles", cycles)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RePr {name} must be a positive integer, got {name}={value!r}.")
        if not isinstance(prune_ratio, numbers.Real) or not 0.0 < prune_ratio < 1.0:
            raise ValueError(f"RePr prune_ratio must lie in (0, 1), got prune_ratio={prune_ratio!r}.")
        if unit not in UNITS:
            raise ValueError(f"Unknown RePr unit '{unit}'. Valid units: {list(UNITS)}.")
        self.criterion = criteria_lib.get(criterion)
        if self.criterion.reads_gamma:
            raise ValueError(f"Criterion '{self.criterion.name}' reads normalisation layers, not kernels; RePr ranks "
                             "the filters of convolution kernels. Use 'orthogonality' or 'l1'.")
        self.s1, self.s2, self.cycles = int(s1), int(s2), int(cycles)
        self.prune_ratio = float(prune_ratio)
        self.unit = unit
        self.verbose = verbose
        self.seed = seed
        #: Models to act on in every hook instead of ``self.model`` (set by a trainer of several models; a
        #: PeerEnsemble being fit gives its peers and their optimizers).
        self.models = None
        #: Their optimizers, aligned with ``models``; None: each model's ``model.optimizer``.
        self.optimizers = None
        self._rng = np.random.default_rng(seed)
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
            "verbose": self.verbose,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**dict(config, criterion=criteria_lib.get(config["criterion"])))

    # -- state per model ---------------------------------------------------------------------------------------

    def _targets(self):
        """[(model, optimizer)] the hooks act on."""
        models, optimizers = self.models, self.optimizers
        if models is None and isinstance(self.model, PeerEnsemble) and self.model.peer_optimizers:
            models, optimizers = self.model.peers, self.model.peer_optimizers  # each peer its own schedule
        models = models if models is not None else [self.model]
        if optimizers is None:
            optimizers = [getattr(model, "optimizer", None) for model in models]
        if len(optimizers) != len(models):
            raise ValueError(f"RePr has {len(models)} models but {len(optimizers)} optimizers.")
        return list(zip(models, optimizers))

    def _state(self, model, optimizer):
        state = self._states.get(id(model))
        if state is None or state.model is not model:
            state = _ModelState(model, optimizer, self._plans(model, optimizer))
            self._states[id(model)] = state
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
        if getattr(model, "steps_per_execution", 1) != 1:
            raise ValueError("RePr holds dropped filters at zero after every step, which callbacks only see with "
                             f"steps_per_execution=1; model '{model.name}' has {model.steps_per_execution}.")

    def _plans(self, model, optimizer):
        """The ranked layers of ``model``: every convolution after the first, depthwise ones excepted."""
        self._check_model(model, optimizer)
        convs = layouts.filter_layers(model)
        if len(convs) < 2:
            raise ValueError(f"RePr needs at least two convolution layers (the first is never pruned); model "
                             f"'{model.name}' has {len(convs)}.")
        weights = model.weights
        owners = {id(w): layer for layer in layouts.flatten_layers(model) for w in layer.weights}
        groups = {group.name: group for group in groups_lib.graft_structure(model).groups}
        plans = []
        for layer in convs[1:]:
            if isinstance(layer, _DEPTHWISE):
                continue
            members = [(weights[i], axes, owners[id(weights[i])]) for i, axes in groups[layer.name].members]
            plan = _LayerPlan(layer, members)
            scores = self.criterion(plan.kernel.value, per_filter=True, filter_axes=plan.axes)
            if tuple(scores.shape) != (plan.num_filters,):
                raise ValueError(f"Criterion '{self.criterion.name}' does not rank filters: for layer '{layer.name}' "
                                 f"with {plan.num_filters} filters it returned shape {tuple(scores.shape)}.")
            plans.append(plan)
        if all(plan.num_filters < 2 for plan in plans):
            raise ValueError(f"RePr cannot drop any filter of model '{model.name}': no convolution layer after the "
                             "first (depthwise ones aside) has two filters or more.")
        return plans

    def state_of(self, model=None):
        """(phase name, 1-based cycle, filters dropped now) of ``model`` (default: the callback's model)."""
        state = self._states.get(id(model if model is not None else self.model))
        if state is None:
            return PHASES[FULL], 1, 0
        phase, cycle = phase_at(state.units_done, self.s1, self.s2, self.cycles)
        return PHASES[phase], cycle, state.dropped_count if phase == PRUNED else 0

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
            self._state(model, optimizer)

    def on_train_batch_end(self, batch, logs=None):
        for target in self._targets():
            state = self._state(*target)
            if phase_at(state.units_done, self.s1, self.s2, self.cycles)[0] == PRUNED:
                state.hold()
            if self.unit == "step":
                self._advance(state)

    def on_epoch_end(self, epoch, logs=None):
        targets = self._targets()
        for k, target in enumerate(targets):
            state = self._state(*target)
            last_unit = state.units_done - 1 if self.unit == "step" else state.units_done
            phase, cycle = phase_at(max(last_unit, 0), self.s1, self.s2, self.cycles)
            dropped = state.dropped_count if phase == PRUNED else 0
            if self.unit == "epoch":
                self._advance(state)
            if logs is not None:
                suffix = "" if len(targets) == 1 else f"_{k}"
                logs.update({f"repr_phase{suffix}": phase, f"repr_cycle{suffix}": cycle,
                             f"repr_dropped{suffix}": dropped, f"repr_fallbacks{suffix}": state.fallbacks})

    # -- schedule ----------------------------------------------------------------------------------------------

    def _advance(self, state):
        """Ends one unit; drops filters when S2 starts next and re-initialises them when it has just ended."""
        before, cycle = phase_at(state.units_done, self.s1, self.s2, self.cycles)
        state.units_done += 1
        after = phase_at(state.units_done, self.s1, self.s2, self.cycles)[0]
        if before == FULL and after == PRUNED:
            self._drop(state, cycle)
        elif before == PRUNED and after != PRUNED:
            self._reinitialise(state, cycle)

    def _drop(self, state, cycle):
        """Ranks the filters, records the dropped ones' values and zeroes them with their optimizer slots."""
        scores = [self.criterion(p.kernel.value, per_filter=True, filter_axes=p.axes).numpy() for p in state.plans]
        chosen = select_filters(scores, self.prune_ratio, self.criterion.higher_is_better)
        dropped = {i: idx for i, idx in enumerate(chosen) if idx.size}
        state.pre_drop = {i: to_rows(state.plans[i].kernel.numpy(), state.plans[i].axes)[idx]
                          for i, idx in dropped.items()}
        state.drop(dropped)
        state.hold()
        event = {
            "event": "drop", "model": state.model.name, "cycle": cycle, "unit": state.units_done,
            "dropped": {state.plans[i].name: int(idx.size) for i, idx in state.dropped.items()},
            "indices": {state.plans[i].name: idx.tolist() for i, idx in state.dropped.items()},
        }
        self._events.append(event)
        if self.verbose:
            logging.info("RePr %s cycle %d: dropped %d filters %s", state.model.name, cycle, state.dropped_count,
                         event["dropped"])

    def _reinitialise(self, state, cycle):
        """Gives the dropped filters new values orthogonal to the survivors and to their pre-drop values.

        Each layer reaches a level of :data:`LEVELS`; levels other than ``"orthogonal"`` count as fallbacks.
        """
        state.hold()  # the dropped filters and their slots are zero before their new values arrive
        levels = {}
        for i, dropped in state.dropped.items():
            plan = state.plans[i]
            levels[plan.name] = self._reinitialise_layer(plan, dropped, state.pre_drop[i])
            for var, axes, owner in plan.members:
                if var is not plan.kernel:
                    self._reset_to_initializer(var, axes, owner, dropped)
        state.pre_drop = {}
        fallbacks = {name: level for name, level in levels.items() if level != LEVELS[0]}
        state.fallbacks += len(fallbacks)
        for name, level in fallbacks.items():
            logging.warning("RePr %s cycle %d: layer '%s' has too few values per filter for a null space orthogonal "
                            "to all %s; its re-initialised filters are %s.", state.model.name, cycle, name,
                            "surviving and pre-drop filters" if level == LEVELS[1] else "surviving filters",
                            "orthogonal to the surviving filters only" if level == LEVELS[1]
                            else "a fresh draw of the layer's initializer")
        self._events.append({
            "event": "reinit", "model": state.model.name, "cycle": cycle, "unit": state.units_done,
            "reinitialised": {state.plans[i].name: int(idx.size) for i, idx in state.dropped.items()},
            "levels": levels,
        })
        if self.verbose:
            logging.info("RePr %s cycle %d: re-initialised %d filters %s", state.model.name, cycle,
                         state.dropped_count, levels)

    def _reinitialise_layer(self, plan, dropped, pre_drop):
        """Writes the new kernel rows of one layer's ``dropped`` filters; returns the level reached."""
        kernel = plan.kernel.numpy()
        rows = to_rows(kernel, plan.axes).astype(np.float64)
        fresh = to_rows(_initializer_draw(_initializer(plan.layer, plan.kernel), kernel.shape, self._rng), plan.axes)
        if not np.any(fresh):
            fresh = self._rng.normal(0.0, math.sqrt(2.0 / rows.shape[1]), fresh.shape)
        survivors = np.delete(rows, dropped, axis=0)
        directions, level = orthogonal_directions([np.concatenate([survivors, pre_drop]), survivors],
                                                  dropped.size, rows.shape[1], self._rng)
        if directions is None:
            rows[dropped] = fresh[dropped]
        else:
            rows[dropped] = directions * np.sqrt(np.mean(np.sum(np.square(fresh), axis=1)))
        plan.kernel.assign(from_rows(rows, kernel.shape, plan.axes).astype(kernel.dtype))
        return LEVELS[level]

    def _reset_to_initializer(self, var, axes, owner, dropped):
        """Sets the dropped filters' entries of ``var`` (a bias, gamma, beta, moving statistic) to their initial
        values, drawn from the initializer ``owner`` made it with."""
        value = var.numpy()
        selected = np.zeros(int(np.prod(_filter_shape(value.shape, axes))), bool)
        selected[dropped] = True
        initial = _initializer_draw(_initializer(owner, var), value.shape, self._rng)
        var.assign(np.where(selected.reshape(_filter_shape(value.shape, axes)), initial, value).astype(value.dtype))
