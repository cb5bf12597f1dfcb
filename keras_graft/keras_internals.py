"""Every use of Keras internals (``keras.src`` modules and private attributes), in one place.

Keras 3 has no public API for these needs; each wrapper names the internal it relies on, so that a Keras upgrade
that moves one breaks here (and in ``tests/test_keras_internals.py``) rather than across the package. No other
keras_graft module imports ``keras.src`` or reads a private Keras attribute.
"""

import keras
from keras.src.utils import io_utils

__all__ = ["print_msg", "optimizer_slots", "track_trackable", "inbound_nodes", "outbound_nodes", "initial_epoch",
           "set_initial_epoch"]


def print_msg(message):
    """Prints ``message`` as Keras' own progress messages do: ``keras.src.utils.io_utils.print_msg`` writes to
    stdout, or to absl logging after ``keras.config.disable_interactive_logging()``."""
    io_utils.print_msg(message)


def optimizer_slots(optimizer, variable):
    """The optimizer's own variables for ``variable``: momentum, Adam's m and v, accumulators, EMA, ...

    Keras 3 optimizers keep each kind of slot in a list aligned with the variables they were built for
    (``SGD.momentums``, ``Adam._momentums`` and ``._velocities``, ...), with no public accessor. Relies on the
    private ``optimizer._trainable_variables`` (the variables the optimizer was built for),
    ``optimizer._get_variable_index(variable)`` and ``vars(optimizer)``: every attribute of the optimizer (or of
    the optimizer a LossScaleOptimizer wraps) that is such an aligned list contributes the entry at ``variable``'s
    index. Slots shaped differently from their variable (Adafactor's factored moments) are not found.
    """
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    trainable = list(getattr(optimizer, "_trainable_variables", []))
    if not trainable:
        return []
    index = optimizer._get_variable_index(variable)  # pylint: disable=protected-access

    def aligned(value):
        if not isinstance(value, (list, tuple)) or len(value) != len(trainable) or value is trainable:
            return False
        pairs = [(slot, var) for slot, var in zip(value, trainable) if slot is not None]
        return bool(pairs) and all(isinstance(slot, keras.Variable) and slot is not var
                                   and tuple(slot.shape) == tuple(var.shape) for slot, var in pairs)

    slot_lists = [value for value in vars(optimizer).values() if aligned(value)]
    return [slots[index] for slots in slot_lists if slots[index] is not None]


def track_trackable(model, trackable, name):
    """Makes ``trackable`` a checkpoint dependency of ``model`` named ``name`` (``tf.train.Checkpoint`` saves and
    restores it with the model) through the private ``model._track_trackable``, the call Keras itself makes for
    the attributes it tracks."""
    model._track_trackable(trackable, name=name, overwrite=True)  # pylint: disable=protected-access


def attach_state(model, name, state):
    """Sets ``state`` as ``model.<name>`` past Keras' layer tracking and makes it a checkpoint dependency.

    Keras' weight files (``save_weights``, ``BackupAndRestore``, ``ModelCheckpoint``) walk a model's attributes,
    so the state is saved with the model while staying out of ``model.layers`` and ``model.weights`` (which
    grafting and parameter counts read); ``tf.train.Checkpoint`` needs the explicit dependency of
    :func:`track_trackable`.
    """
    object.__setattr__(model, name, state)
    track_trackable(model, state, name)


def inbound_nodes(layer):
    """The graph nodes where ``layer`` was called (private ``layer._inbound_nodes``; empty for a layer of a
    subclassed model, which has no graph). ``node.parent_nodes[k].operation`` is the layer feeding input k."""
    return getattr(layer, "_inbound_nodes", [])


def outbound_nodes(layer):
    """The graph nodes that consume ``layer``'s output (private ``layer._outbound_nodes``); ``node.operation`` is
    the consuming layer."""
    return getattr(layer, "_outbound_nodes", [])


def initial_epoch(model):
    """The epoch ``model.fit`` starts from when a callback moves it (private ``model._initial_epoch``, which
    ``keras.callbacks.BackupAndRestore`` sets), or None when nothing set it."""
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model, epoch):
    """Makes the running ``model.fit`` start at ``epoch`` when set in ``on_train_begin``, as
    ``keras.callbacks.BackupAndRestore`` does through the private ``model._initial_epoch``; None restores the
    epoch that ``fit`` was asked for."""
    model._initial_epoch = epoch  # pylint: disable=protected-access
