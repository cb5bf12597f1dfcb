"""GraftTrainer: N peer models trained side by side in one custom loop under any tf.distribute strategy.

The reference code of Meng et al. (CVPR 2020) runs one process per network and swaps checkpoint files through the
disk. Here all N peers live in one program: one compiled step runs every model's forward pass, backward pass and
optimizer update through ``strategy.run``; at the end of every n-th epoch one compiled graft mixes the models in a
ring (model k takes from model k-1, reading the weights from before the round) in cross-replica context, so every
replica and every worker receives the same values.

Diversity between peers (each switchable): the initial learning rate spread lr_k = lr * (1 + cos(pi*(N-k)/N)) / 2,
per-step cosine annealing or step decay (:mod:`keras_graft.schedules`), and a data order of its own per model.

The step itself (losses, distillation, loss scaling under mixed_float16, the atomic update) is the one
:class:`keras_graft.PeerEnsemble` trains with in Keras' ``fit``: :mod:`keras_graft.steps`.
"""

import inspect
import json
import math
import numbers
import re
import shutil
import tempfile
import uuid

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_graft import checks
from keras_graft import config as config_lib
from keras_graft import distillation as distillation_lib
from keras_graft import grafting as grafting_lib
from keras_graft import keras_internals
from keras_graft import rounds as rounds_lib
from keras_graft import schedules as schedules_lib
from keras_graft import steps as steps_lib
from keras_graft import strategies as strategies_lib
from keras_graft.ensemble import PeerEnsemble

DATA_ORDERS = ("per_model", "shared")
_DEFAULT_SHUFFLE_BUFFER = 10_000


def _seed_states(model):
    """The states of a model's random seed generators (Dropout, ...): its variables that are not weights."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _spec(variable):
    return [list(variable.shape), str(variable.dtype)]


class _Backup:
    """Checkpoints of all models, optimizer states, seed generators, the epoch and the data seed in ``directory``.

    Only the chief writes there; the other workers of a multi-worker strategy save to a temporary directory they
    delete (the standard TensorFlow pattern: every worker must take part in saving). CheckpointManager writes the
    data files first and then renames the "checkpoint" index into place, so a killed run leaves the last complete
    checkpoint; two are kept. Restoring checks every tensor of the newest checkpoint (CRC-32C) and falls back to the
    previous one, with a warning naming the damaged files. ``graft_trainer.json`` next to the checkpoints records the
    configuration (number of models, layers and weights, optimizers, seed generators); a checkpoint of another
    configuration is refused with an error that says what differs.
    """

    SIGNATURE = "graft_trainer.json"

    def __init__(self, directory, checkpoint, strategy, signature):
        self.directory = directory.rstrip("/") if directory != "/" else directory
        self.checkpoint = checkpoint
        self.strategy = strategy
        self.signature = signature
        self._manager = None
        self._signature_written = False

    @staticmethod
    def check_directory(directory):
        """Fails before training when ``directory`` cannot hold checkpoints (a file, or not creatable)."""
        if tf.io.gfile.exists(directory) and not tf.io.gfile.isdir(directory):
            raise ValueError(f"backup_dir {directory!r} is a file, not a directory: GraftTrainer writes its "
                             "checkpoints into a directory.")
        try:
            tf.io.gfile.makedirs(directory)
        except (tf.errors.OpError, OSError) as error:
            raise ValueError(f"backup_dir {directory!r} cannot be created: {error}") from None

    def _candidates(self):
        """Checkpoint prefixes in the directory, newest first (also those the state file no longer lists)."""
        if not tf.io.gfile.isdir(self.directory):
            return []
        numbers = set()
        for name in tf.io.gfile.listdir(self.directory):
            match = re.match(r"^ckpt-(\d+)\.(index|data-\d+-of-\d+)$", name)
            if match:
                numbers.add(int(match.group(1)))
        return [f"{self.directory}/ckpt-{n}" for n in sorted(numbers, reverse=True)]

    @staticmethod
    def _defect(prefix):
        """None when every tensor of the checkpoint reads back intact; else (files, what is wrong)."""
        index = f"{prefix}.index"
        data = sorted(tf.io.gfile.glob(f"{prefix}.data-*"))
        if not tf.io.gfile.exists(index):
            return index, "the .index file is missing"
        if not data:
            return f"{prefix}.data-*", "the data file is missing"
        try:
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        except Exception as error:  # noqa: BLE001 - any failure to read a tensor back means a damaged file
            message = (str(getattr(error, "message", error)).strip().splitlines() or [""])[0]
            return ", ".join([index, *data]), f"{type(error).__name__}: {message}"
        return None

    def _check_signature(self):
        path = f"{self.directory}/{self.SIGNATURE}"
        if not tf.io.gfile.exists(path):
            return  # written by an older version: the restore itself checks what it can
        try:
            with tf.io.gfile.GFile(path, "r") as f:
                saved = json.loads(f.read())
        except (ValueError, tf.errors.OpError) as error:
            logging.warning("GraftTrainer: cannot read %s (%s); restoring without comparing configurations.", path,
                            error)
            return
        differences = _signature_differences(saved, self.signature)
        if differences:
            raise ValueError(f"GraftTrainer: backup_dir {self.directory} holds checkpoints of another configuration "
                             f"({path}): " + "; ".join(differences) + ". Use another backup_dir for this "
                             "configuration, or delete the old one.")

    def restore(self):
        """Restores the newest intact checkpoint; returns True when there was one.

        Raises ValueError when the checkpoints belong to another configuration or none of them is intact.
        """
        candidates = self._candidates()
        if not candidates:
            return False
        self._check_signature()
        problems = []
        for prefix in candidates:
            defect = self._defect(prefix)
            if defect is not None:
                files, what = defect
                logging.warning("GraftTrainer: checkpoint %s is damaged (%s: %s); falling back to the previous one.",
                                prefix, files, what)
                problems.append(f"{files}: {what}")
                continue
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except (AssertionError, ValueError, tf.errors.OpError) as error:
                raise ValueError(f"GraftTrainer: checkpoint {prefix} in backup_dir does not fit this trainer (another "
                                 f"number of models, architecture or optimizer?): {error}") from None
            logging.info("GraftTrainer: restored %s.", prefix)
            return True
        raise ValueError(f"GraftTrainer: no intact checkpoint in backup_dir {self.directory}: "
                         + "; ".join(problems) + ". Delete the damaged files (or the directory) to start over.")

    def _write_signature(self):
        if self._signature_written:
            return
        path = f"{self.directory}/{self.SIGNATURE}"
        temporary = f"{self.directory}/.{self.SIGNATURE}.tmp-{uuid.uuid4().hex}"
        tf.io.gfile.makedirs(self.directory)
        with tf.io.gfile.GFile(temporary, "w") as f:
            f.write(json.dumps(self.signature, indent=1))
        tf.io.gfile.rename(temporary, path, overwrite=True)
        self._signature_written = True

    def save(self):
        if self.strategy.extended.should_checkpoint:
            self._write_signature()
            if self._manager is None:
                self._manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=2)
            self._manager.save()
            return
        scratch = tempfile.mkdtemp(prefix="graft_worker_backup_")
        try:
            tf.train.CheckpointManager(self.checkpoint, scratch, max_to_keep=1).save()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _signature_differences(saved, current):
    """What differs between two configuration signatures, in words."""
    differences = []
    if saved.get("num_models") != current["num_models"]:
        differences.append(f"number of models: {saved.get('num_models')} in the checkpoint, {current['num_models']} "
                           "here")
    if saved.get("layers") != current["layers"]:
        differences.append(f"architecture: layers {saved.get('layers')} in the checkpoint, {current['layers']} here")
    elif saved.get("weights") != current["weights"]:
        old, new = saved.get("weights") or [], current["weights"]
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                differences.append(f"architecture: weight {i} has shape {tuple(a[0])} ({a[1]}) in the checkpoint, "
                                   f"{tuple(b[0])} ({b[1]}) here")
                break
        else:
            differences.append(f"architecture: {len(old)} weights per model in the checkpoint, {len(new)} here")
    old_optimizers = saved.get("optimizers") or []
    for k, (a, b) in enumerate(zip(old_optimizers, current["optimizers"])):
        if a.get("class") != b["class"]:
            differences.append(f"optimizer of model {k}: {a.get('class')} in the checkpoint, {b['class']} here")
            break
        if a.get("variables") != b["variables"] and not differences:  # an architecture change changes them too
            old_count, new_count = len(a.get("variables") or []), len(b["variables"])
            what = (f"{old_count} variables in the checkpoint, {new_count} here" if old_count != new_count
                    else "its variables have other shapes or dtypes")
            differences.append(f"optimizer of model {k}: {what} (other settings, e.g. momentum or EMA?)")
            break
    if saved.get("seed_generators") != current["seed_generators"] and not differences:
        differences.append(f"random seed generators per model: {saved.get('seed_generators')} in the checkpoint, "
                           f"{current['seed_generators']} here")
    if saved.get("distillation") != current["distillation"]:
        differences.append(f"distillation: {saved.get('distillation')} in the checkpoint, {current['distillation']} "
                           "here")
    return differences


def _holds_graft_settings(obj):
    """Whether ``obj`` is a Grafting callback (duck-typed: a GraftConfig in ``config`` and ``peers``)."""
    return isinstance(getattr(obj, "config", None), config_lib.GraftConfig) and hasattr(obj, "peers")


def _graft_settings(grafting):
    """(GraftConfig or None, peer source or None (a ring), verbose) from GraftTrainer's ``grafting`` argument."""
    if grafting is None:
        return None, None, 0
    if isinstance(grafting, config_lib.GraftConfig):
        return grafting, None, 0
    if isinstance(grafting, dict):
        settings = dict(grafting)
        verbose = checks.verbose("GraftTrainer", settings.pop("verbose", 0))
        return config_lib.GraftConfig(**settings, owner="GraftTrainer"), None, verbose
    if _holds_graft_settings(grafting):
        source = grafting.peers
        if source is not None and not getattr(source, "per_member", False):
            raise ValueError(f"GraftTrainer grafts its own models in a ring (Grafting(peers=None, ...)) or each "
                             f"from its own scion (Grafting(keras_graft.NoiseScion())); got peers "
                             f"{type(source).__name__}.")
        return grafting.config, source, grafting.verbose
    raise TypeError(f"grafting must be None, a keras_graft.GraftConfig, a dict of its settings or a "
                    f"keras_graft.Grafting callback; got {type(grafting).__name__}.")


def _check_arguments(model_fn, metrics, lr_spread, seed, backup_dir, distillation):
    """Type checks of GraftTrainer's arguments that need no strategy (the others are checked where used)."""
    if isinstance(model_fn, keras.Model):
        raise TypeError(f"GraftTrainer: model_fn must be a function that builds a model, got a Model "
                        f"('{model_fn.name}'). GraftTrainer builds each of its N models with its own "
                        "initialisation: pass e.g. `lambda: build_model()` (a function returning a new model per "
                        "call), not a model instance.")
    if not callable(model_fn):
        raise TypeError(f"GraftTrainer: model_fn must be a function that builds a model, got "
                        f"{checks.shown(model_fn)}.")
    if metrics is not None and (isinstance(metrics, (str, keras.metrics.Metric)) or
                                not isinstance(metrics, (list, tuple))):
        raise TypeError(f"GraftTrainer: metrics must be a list of metric names or objects, got "
                        f"{checks.shown(metrics)} (write metrics=[{metrics!r:.40}]).")
    checks.boolean("GraftTrainer", "lr_spread", lr_spread)
    checks.integer("GraftTrainer", "seed", seed, allow_none=True)
    if backup_dir is not None:
        checks.path("GraftTrainer", "backup_dir", backup_dir)
    if distillation is not None and not isinstance(distillation, distillation_lib.Distillation):
        raise TypeError(f"GraftTrainer: distillation must be None or a keras_graft.Distillation, got "
                        f"{checks.shown(distillation)}.")


class GraftTrainer:
    """Trains N peer models side by side and grafts them in a ring (Meng et al., CVPR 2020).

    ``trainer = GraftTrainer(build_model, 2, optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
    loss="sparse_categorical_crossentropy", metrics=["accuracy"], grafting=Grafting())``, then
    ``trainer.fit(dataset, epochs=200, batch_size=128, validation_data=test)``.

    Args:
      model_fn: builds one model per call, functional or Sequential with a known input shape. Called N times in
        the strategy's scope, so every model has its own initialisation.
      num_models: N >= 1.
      optimizer: an optimizer (object, name or config), cloned per model; or a callable ``k -> optimizer`` that
        builds model k's optimizer (then set its learning rate there: ``schedules.spread_learning_rates`` helps).
      loss: a Keras loss (object or identifier).
      metrics: metric names or objects, tracked per model and for the ensemble ("accuracy" as in ``compile``).
      grafting: a :class:`keras_graft.GraftConfig`, a dict of its arguments (plus ``verbose``: 1 prints a line
        per round), or a ``keras_graft.Grafting`` callback used for its settings, its ``verbose`` and its peers:
        None grafts the models in a ring, a scion (``Grafting(keras_graft.NoiseScion())``) grafts each model from
        its own copy (``scion.for_member(k)``; the noise also depends on k) with the ring's timing and log keys.
        None trains N independent models (the fair baseline).
      strategy: a tf.distribute strategy or "default" | "mirrored" | "multi_worker"; None: the current one.
      lr_spread: give model k (k = 1..N) the initial rate lr * (1 + cos(pi * (N - k) / N)) / 2.
      lr_schedule: None, "cosine", "step", a dict (``{"name": "step", "every_epochs": 60, "factor": 0.1}``) or a
        callable initial_rate -> LearningRateSchedule; applied per step to every model's rate. None: Keras'
        learning-rate callbacks (``ReduceLROnPlateau``, ``LearningRateScheduler``) set model 0's rate, and the
        other models follow at their initial ratio to it.
      data_order: "per_model" (each model its own shuffle) or "shared" (all models see the same batches).
      seed: seeds the models' initialisation (``keras.utils.set_random_seed``) and the data order. None: random
        (the data seed is still kept in the backup, so a resumed run sees the same data order). tf.data combines
        the data seed with TensorFlow's global seed, which this sets: restart a run with the same ``seed``.
      backup_dir: directory for checkpoints after every epoch; ``fit`` resumes exactly from the last intact one
        (models, optimizers, seed generators, epoch, data seed, health flags), refuses checkpoints of another
        configuration, and falls back to the previous checkpoint when the newest is damaged.
      max_loss_ratio: a model is unhealthy after an epoch whose loss is not finite or exceeds this multiple of the
        best model's loss (when that is positive); unhealthy models are not grafted into their peers and the
        ensemble leaves them out. None: only non-finite losses count. Default 10.
      distillation: a :class:`keras_graft.Distillation`: cultivation (with grafting) or deep mutual learning.
        Teachers run inside the same compiled step, once per batch with ``data_order="shared"`` (which the mutual
        option needs, so that students compare predictions on the same images), otherwise once per model's batch.
        Logs then carry ``task_loss_k`` and ``distill_loss_k``.
      shared_initialization: start every model from model 0's initial weights (diversity then comes from the
        learning rates and data orders alone). With 2 models, the first round of grafting then mixes two related
        networks instead of averaging two random initialisations, which drops both to chance.
      steps_per_execution: training steps per compiled call (as in Keras' ``compile``): fewer Python round trips
        for small models; batch callbacks then run once per call.
    """

    def __init__(self, model_fn, num_models=2, optimizer="sgd", loss=None, metrics=None, grafting=None,
                 strategy=None, lr_spread=False, lr_schedule=None, data_order="per_model", seed=None,
                 backup_dir=None, distillation=None, steps_per_execution=1, shared_initialization=False,
                 max_loss_ratio=10.0):
        _check_arguments(model_fn, metrics, lr_spread, seed, backup_dir, distillation)
        if not isinstance(num_models, numbers.Real):
            raise TypeError(f"GraftTrainer: num_models must be an integer >= 1, got {checks.shown(num_models)}.")
        if isinstance(num_models, bool) or int(num_models) != num_models or num_models < 1:
            raise ValueError(f"num_models must be an integer >= 1, got {num_models!r}.")
        if data_order not in DATA_ORDERS:
            raise ValueError(f"data_order must be one of {list(DATA_ORDERS)}, got {data_order!r}.")
        self.num_models = int(num_models)
        checks.integer("GraftTrainer", "steps_per_execution", steps_per_execution)
        if isinstance(steps_per_execution, bool) or int(steps_per_execution) != steps_per_execution or \
                steps_per_execution < 1:
            raise ValueError(f"steps_per_execution must be an integer >= 1, got {steps_per_execution!r}.")
        self.steps_per_execution = int(steps_per_execution)
        self.grafting, graft_source, self._graft_verbose = _graft_settings(grafting)
        if self.grafting is not None and graft_source is None and self.num_models < 2:
            raise ValueError("Grafting in a ring needs at least 2 models; use grafting=None for a single model.")
        self.strategy = strategies_lib.get(strategy)
        self.loss = steps_lib.resolve_loss(loss)
        self.metric_specs = list(metrics or [])
        self.data_order = data_order
        self.distillation = distillation
        if distillation is not None and distillation.mutual and data_order != "shared":
            raise ValueError("Mutual distillation compares the students' predictions on the same batch: use "
                             "data_order='shared'.")
        self.lr_spread = bool(lr_spread)
        if max_loss_ratio is not None and not (max_loss_ratio >= 1 and math.isfinite(max_loss_ratio)):
            raise ValueError(f"max_loss_ratio must be a finite number >= 1 or None, got {max_loss_ratio!r}.")
        self.max_loss_ratio = None if max_loss_ratio is None else float(max_loss_ratio)
        if backup_dir is not None:
            _Backup.check_directory(str(backup_dir))
        self.backup_dir = backup_dir
        if seed is not None:
            keras.utils.set_random_seed(seed)
        data_seed = int(seed) if seed is not None else int(np.random.SeedSequence().generate_state(1)[0] >> 1)

        with self.strategy.scope():
            self.models = self._build_models(model_fn)
            if shared_initialization:
                for model in self.models[1:]:
                    model.set_weights(self.models[0].get_weights())
            # Variables created in scope take the chief's initial value on every worker.
            self._data_seed = tf.Variable(data_seed, dtype=tf.int64, trainable=False, name="data_seed")
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self._schedule_epochs = tf.Variable(1, dtype=tf.int64, trainable=False, name="schedule_epochs")
            self._steps_per_epoch = tf.Variable(1, dtype=tf.int64, trainable=False, name="steps_per_epoch")
            # Which models ended the last epoch with a finite loss: the next round (which opens the next epoch,
            # possibly after a resume) does not mix the others into their peers.
            self._healthy = tf.Variable([True] * self.num_models, trainable=False, name="healthy_models")
            self._schedule = schedules_lib.schedule_factory(lr_schedule, self._schedule_epochs, self._steps_per_epoch)
            self.optimizers = self._build_optimizers(optimizer)
            for model, opt in zip(self.models, self.optimizers):
                opt.build(model.trainable_variables)
            output_shape = tuple(self.models[0].outputs[0].shape)
            self.ensemble = PeerEnsemble(self.models, steps_lib.output_activation(self.loss, output_shape),
                                         name="peers")
            # Read by TensorBoard for the step counter, set by Keras' learning-rate callbacks: model 0's rate leads.
            self.ensemble.optimizer = self.optimizers[0]
            self._followed_rates = schedules_lib.FollowedRates.create(self.optimizers[0], self.optimizers)
            self.ensemble.peer_optimizers = self.optimizers  # Callbacks (RePr) find the models' optimizers here.
            self.ensemble.stop_training = False
            if distillation is not None:
                distillation.build(self.models)
            terms = ("task_loss", "distill_loss") if distillation is not None else ()
            self._trackers = [steps_lib.Tracker(self.metric_specs, f"_{k}", terms) for k in range(self.num_models)]
            self._ensemble_tracker = steps_lib.Tracker(self.metric_specs, "_ensemble")
        self._step = steps_lib.PeerStep(self.models, self.optimizers, self.loss, self._trackers, distillation,
                                        self._ensemble_tracker, self.ensemble.probabilities, self._healthy)
        self._rounds = None
        if self.grafting is not None:
            with self.strategy.scope():  # a scion's state (attached to each model) is created here
                self._rounds = rounds_lib.MemberRounds(self.models, self.grafting, graft_source)
        self._backup = None
        if backup_dir is not None:
            # Seed generator states (Dropout, ...) are not weights: listed explicitly so a resume is exact.
            checkpoint = tf.train.Checkpoint(models=self.models, optimizers=self.optimizers, epoch=self._epoch,
                                             data_seed=self._data_seed, healthy_models=self._healthy,
                                             seed_generators=[_seed_states(m) for m in self.models])
            self._backup = _Backup(str(backup_dir), checkpoint, self.strategy, self._signature())
        self._train_function = None
        self._test_function = None
        self._predict_function = None
        self._results_function = None
        self._sync_function = None

    # Construction.

    def _signature(self):
        """The configuration a checkpoint must match (JSON-able): models, architecture, optimizers, seeds."""
        model = self.models[0]
        return {
            "format": 1,
            "num_models": self.num_models,
            "layers": [type(layer).__name__ for layer in model.layers],
            "weights": [_spec(w) for w in model.weights],
            "optimizers": [{"class": type(opt).__name__, "variables": [_spec(v) for v in opt.variables]}
                           for opt in self.optimizers],
            "seed_generators": len(_seed_states(model)),
            "distillation": self.distillation is not None,
        }

    def _build_models(self, model_fn):
        models = [model_fn() for _ in range(self.num_models)]
        for k, model in enumerate(models):
            if not isinstance(model, keras.Model):
                raise TypeError(f"model_fn must return a Keras model; call {k} returned {type(model).__name__}.")
            if any(model is other for other in models[:k]):
                raise ValueError("model_fn returned the same model object twice: it must build a new model per call.")
            if not model.built or not getattr(model, "inputs", None):
                raise ValueError(f"Model {k} ('{model.name}') is not built: model_fn must return functional or "
                                 "Sequential models with a known input shape (start with keras.Input).")
            if k:
                grafting_lib.check_compatible(models[0], grafting_lib.weight_specs(model),
                                              f"Model {k} ('{model.name}') from model_fn")
                if tuple(model.inputs[0].shape) != tuple(models[0].inputs[0].shape):
                    raise ValueError(f"Model {k} ('{model.name}') from model_fn takes inputs of shape "
                                     f"{tuple(model.inputs[0].shape)}, model 0 of {tuple(models[0].inputs[0].shape)}.")
        return models

    def _build_optimizers(self, optimizer):
        """Model k's optimizer (a LossScaleOptimizer when the models compute in mixed_float16)."""
        if callable(optimizer) and not isinstance(optimizer, keras.optimizers.Optimizer):
            if self.lr_spread or self._schedule is not None:
                raise ValueError("With an optimizer factory, set each model's learning rate in the factory "
                                 "(lr_spread and lr_schedule apply to a single optimizer that is cloned).")
            optimizers = [optimizer(k) for k in range(self.num_models)]
            for k, opt in enumerate(optimizers):
                if not isinstance(opt, keras.optimizers.Optimizer):
                    raise TypeError(f"The optimizer factory returned {type(opt).__name__} for model {k}, not a "
                                    "Keras optimizer.")
                if any(opt is other for other in optimizers[:k]):
                    raise ValueError("The optimizer factory returned the same optimizer twice; build one per model.")
            if self._mixed_float16():
                optimizers = [o if isinstance(o, keras.optimizers.LossScaleOptimizer)
                              else keras.optimizers.LossScaleOptimizer(o) for o in optimizers]
            return optimizers

        def learning_rates(rate):
            rates = [rate] * self.num_models
            if self.lr_spread or self._schedule is not None:
                if not isinstance(rate, (int, float)):
                    raise ValueError("lr_spread and lr_schedule need an optimizer with a constant initial learning "
                                     f"rate, got {rate!r}.")
                if self.lr_spread:
                    rates = schedules_lib.spread_learning_rates(float(rate), self.num_models)
            if self._schedule is not None:
                rates = [self._schedule(rate) for rate in rates]
            return rates

        return steps_lib.clone_optimizers(keras.optimizers.get(optimizer), learning_rates, self._mixed_float16())

    def _mixed_float16(self):
        """Whether the models compute in float16: their optimizers then scale the loss."""
        return self.models[0].dtype_policy.name == "mixed_float16"

    # Data.

    def _input_spec_error(self, what, spec):
        shapes = [tuple(t.shape) for t in self.models[0].inputs]
        return ValueError(f"{what} does not fit the models: its elements are {spec}, the models take inputs of "
                          f"shape {shapes[0] if len(shapes) == 1 else shapes} (batch first) and elements must be "
                          "(x, y) pairs.")

    def _batched(self, spec, what):
        """Whether a dataset's (x, y) elements are batches (True) or single examples (False); raises otherwise."""
        if not isinstance(spec, tuple) or len(spec) != 2:
            raise self._input_spec_error(what, spec)
        return self._inputs_batched(spec[0], what, spec)

    def _inputs_batched(self, x_spec, what, spec):
        xs = tf.nest.flatten(x_spec)
        inputs = self.models[0].inputs
        if len(xs) != len(inputs):
            raise self._input_spec_error(what, spec)
        for batched in (True, False):
            fits = all(
                tf.TensorShape(tuple(inp.shape)).is_compatible_with(x.shape if batched else [None, *x.shape])
                for x, inp in zip(xs, inputs)
            )
            if fits:
                return batched
        raise self._input_spec_error(what, spec)

    @staticmethod
    def _as_dataset(data, what):
        if isinstance(data, tf.data.Dataset):
            return data
        if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], tf.data.Dataset):
            x, y = data
            lengths = {len(t) for t in tf.nest.flatten(x)} | {len(t) for t in tf.nest.flatten(y)}
            if len(lengths) != 1:
                raise ValueError(f"{what}: x and y have different numbers of examples ({sorted(lengths)}).")
            return tf.data.Dataset.from_tensor_slices((x, y))
        raise TypeError(f"{what} must be a tf.data.Dataset of (x, y) or a tuple (x, y) of arrays; got "
                        f"{type(data).__name__}.")

    def _shuffle_seed(self, model_index, epoch):
        """The data order depends on (seed, model, epoch) only, so a resumed epoch sees the same batches."""
        k = model_index if self.data_order == "per_model" else 0
        return (int(self._data_seed.numpy()) * 1_000_003 + k * 65_537 + epoch) % (2**31 - 1)

    def _train_pipelines(self, train_data, batch_size, shuffle_buffer):
        """Returns (fn(model_index, input_context, epoch) -> per-replica batches, cardinality of the examples)."""
        replicas = self.strategy.num_replicas_in_sync
        if callable(train_data) and not isinstance(train_data, tf.data.Dataset):
            if batch_size is not None:
                raise ValueError("batch_size is for a dataset of single examples; a dataset function batches its "
                                 "own data (use input_context.get_per_replica_batch_size).")
            takes_epoch = "epoch" in inspect.signature(train_data).parameters

            def user_fn(k, context, epoch):
                k = k if self.data_order == "per_model" else 0  # "shared": every model gets model 0's batches
                return train_data(k, context, epoch=epoch) if takes_epoch else train_data(k, context)

            probe = user_fn(0, tf.distribute.InputContext(1, 0, replicas), 0)
            if not isinstance(probe, tf.data.Dataset):
                raise TypeError(f"The dataset function must return a tf.data.Dataset, got {type(probe).__name__}.")
            if not self._batched(probe.element_spec, "The dataset function's dataset"):
                raise ValueError("The dataset function must return batched data (per-replica batches).")
            return user_fn, None

        dataset = self._as_dataset(train_data, "train_data")
        if self._batched(dataset.element_spec, "train_data"):
            raise ValueError("train_data is already batched: pass unbatched examples with batch_size (each model "
                             "then gets its own shuffle), or a function (model_index, input_context) -> dataset.")
        if batch_size is None or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"fit needs a positive integer batch_size for unbatched train_data, got {batch_size!r}.")
        if batch_size % replicas:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {replicas} replicas of the strategy.")
        examples = int(dataset.cardinality())
        buffer = shuffle_buffer or (examples if examples > 0 else _DEFAULT_SHUFFLE_BUFFER)
        drop_remainder = replicas > 1  # An empty replica batch would put NaN into BatchNormalization statistics.

        def simple_fn(k, context, epoch):
            data = dataset.shuffle(buffer, seed=self._shuffle_seed(k, epoch), reshuffle_each_iteration=False)
            if context.num_input_pipelines > 1:
                data = data.shard(context.num_input_pipelines, context.input_pipeline_id)
            return data.batch(context.get_per_replica_batch_size(batch_size), drop_remainder=drop_remainder)

        return simple_fn, examples

    def _steps(self, examples, batch_size, steps_per_epoch):
        """Steps per epoch, or None when the data decide (a single worker stops when the data run out).

        ``examples``: the size of unbatched train data (or tf.data's INFINITE/UNKNOWN cardinality), None for a
        dataset function.
        """
        infinite = examples == int(tf.data.INFINITE_CARDINALITY)
        available = None
        if examples is not None and examples >= 0:
            replicas = self.strategy.num_replicas_in_sync
            available = examples // batch_size if replicas > 1 else math.ceil(examples / batch_size)
            if available == 0:
                raise ValueError(f"train_data has {examples} examples, fewer than one batch of {batch_size}.")
        if steps_per_epoch is not None:
            if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
                raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}.")
            if available is not None and steps_per_epoch > available:
                raise ValueError(f"steps_per_epoch={steps_per_epoch} but the data give {available} batches per "
                                 "epoch; repeat the dataset or lower steps_per_epoch.")
            return int(steps_per_epoch)
        if infinite:
            raise ValueError("train_data is infinite: pass steps_per_epoch.")
        if available is None and strategies_lib.is_multi_worker(self.strategy):
            raise ValueError("With several workers the number of steps must be known: pass steps_per_epoch.")
        return available

    def _epoch_iterator(self, pipelines, epoch):
        def input_fn(context):
            datasets = tuple(pipelines(k, context, epoch) for k in range(self.num_models))
            return tf.data.Dataset.zip(datasets).prefetch(tf.data.AUTOTUNE)

        return iter(self.strategy.distribute_datasets_from_function(input_fn))

    def _eval_dataset(self, data, batch_size, what):
        """The distributed batched dataset; several workers split it by examples."""
        dataset = self._as_dataset(data, what)
        if not self._batched(dataset.element_spec, what):
            dataset = dataset.batch(batch_size or 32)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        return self.strategy.experimental_distribute_dataset(dataset.with_options(options))

    # Compiled steps.

    def _replica_train_step(self, batches):
        if self._followed_rates is not None:
            self._followed_rates()
        self._step.train([(x, y, None) for x, y in batches], shared=self.data_order == "shared")

    def _train_logs(self):
        """Running per-model results and their mean over models (NaN when a model's loss is NaN)."""
        per_model = [tracker.results() for tracker in self._trackers]
        logs = {f"{name}_{k}": value for k, results in enumerate(per_model) for name, value in results.items()}
        for name in per_model[0]:
            logs[name] = tf.reduce_mean(tf.stack([results[name] for results in per_model]))
        return logs

    def _make_train_function(self):
        # The compiled functions skip AutoGraph (nothing in them branches on tensors): the loop over
        # steps_per_execution is an explicit tf.while_loop, and tracing is cheaper.
        @tf.function(autograph=False)
        def train_function(iterator, steps):
            def one_step(step):
                self.strategy.run(self._replica_train_step, args=(next(iterator),))
                return step + 1

            tf.while_loop(lambda step: step < steps, one_step, [tf.zeros_like(steps)])
            return self._train_logs()

        return train_function

    def _replica_test_step(self, data):
        self._step.test(*data)

    def _make_test_function(self):
        @tf.function(reduce_retracing=True, autograph=False)
        def test_function(batch):
            self.strategy.run(self._replica_test_step, args=(batch,))

        return test_function

    def _results(self):
        """All trackers' results, read in cross-replica context (one compiled function, built once)."""
        if self._results_function is None:
            @tf.function(autograph=False)
            def results():
                logs = self._train_logs()
                logs.update({f"{name}_ensemble": value for name, value in self._ensemble_tracker.results().items()})
                return logs

            self._results_function = results
        return {name: float(value) for name, value in self._results_function().items()}

    def _sync_replicas(self):
        """Averages non-trainable float weights (BatchNormalization statistics) over replicas and workers.

        Keras updates them per replica (aggregation "none"), so they drift apart; assigning the mean in
        cross-replica context gives every replica the same value.
        """
        variables = [v for model in self.models for v in model.non_trainable_weights
                     if v.dtype.startswith("float")]
        if self.strategy.num_replicas_in_sync == 1 or not variables:
            return
        if self._sync_function is None:
            def replica_means():
                context = tf.distribute.get_replica_context()
                return context.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in variables])

            @tf.function(autograph=False)
            def sync():
                means = self.strategy.run(replica_means)
                for variable, mean in zip(variables, means):
                    variable.assign(self.strategy.experimental_local_results(mean)[0])

            self._sync_function = sync
        self._sync_function()

    # Public API.

    def fit(self, train_data, epochs=1, batch_size=None, validation_data=None, callbacks=None,
            steps_per_epoch=None, initial_epoch=0, validation_batch_size=None, shuffle_buffer=None, verbose="auto"):
        """Trains the N models; returns a ``keras.callbacks.History``.

        Args:
          train_data: unbatched examples (a tf.data.Dataset of (x, y) or a tuple of arrays) with ``batch_size``,
            each model shuffling them with its own seed per epoch; or a function ``(model_index, input_context)``
            (optionally with an ``epoch`` keyword) returning model k's per-replica batched dataset (with several
            replicas, batch with ``drop_remainder=True``: an empty replica batch breaks BatchNormalization).
          epochs: train until this epoch (as Keras: ``epochs - initial_epoch`` epochs).
          batch_size: global batch per model; must be divisible by the number of replicas.
          validation_data: a tf.data.Dataset of (x, y) (batched or not) or a tuple (x, y) of arrays.
          callbacks: Keras callbacks; ``callback.model`` is :attr:`ensemble`, whose ``peers`` are the models and
            ``peer_optimizers`` their optimizers (FilterStats and RePr read them).
          steps_per_epoch: steps per epoch (needed for infinite data).
          initial_epoch: first epoch; a checkpoint in ``backup_dir`` from a later epoch takes precedence.
          validation_batch_size: batch for unbatched validation data (default ``batch_size`` or 32).
          shuffle_buffer: shuffle buffer of the unbatched case (default: the whole dataset when its size is known).
          verbose: 0 silent, 1 progress bar, 2 one line per epoch; "auto" is 1.

        Logs per model (``loss_0``, ``accuracy_1``), their mean over models (``loss``, ``accuracy``), validation
        per model, mean and ensemble (``val_loss_0``, ``val_accuracy``, ``val_accuracy_ensemble``), learning rates
        (``learning_rate_0``), ``nonfinite_models`` (models whose epoch loss is NaN or Inf), ``unhealthy_models``
        (those and the models whose loss exceeds ``max_loss_ratio`` times the best: they are not grafted into their
        peers, and the ensemble's validation averages the others) and, with grafting on, per model k (grafting
        model k-1 into model k):

        * ``graft_alpha_k``: the mean coefficient of model k's own weights over the grafted layers;
        * ``graft_alpha_spread_k``: the mean |alpha - 0.5| over them (0: a plain average; at most a / 2);
        * ``graft_peer_distance_k``: ||W_k - W_{k-1}|| / ||W_k|| over the grafted trainable weights, before the
          round (how far the peers drifted apart since the last round; 0: identical);
        * ``graft_layers_k``, ``graft_skipped_layers_k``: layers grafted, and layers left alone because model
          k-1's weights were not finite;

        and without the suffix their mean over models (the counts summed). With 2 models ``graft_alpha`` is 0.5
        by construction (alpha_1 = 1 - alpha_0); ``graft_alpha_spread`` and ``graft_peer_distance`` are the
        headline. Epochs that no round opened log alpha 1 and 0 for the others, so CSVLogger sees the same columns.

        Rounds follow the reference protocol (train -> validate -> save -> graft): the round after epoch e opens
        epoch e + 1, so ``val_*``, the backup and the callbacks of epoch e see the weights before it, and epoch
        e + 1's ``graft_*`` logs describe it (alpha 1 and 0 layers in epochs that no round opened). No round
        follows the final epoch unless ``Grafting(final_graft=True)``: the models returned are the ones last
        validated.
        """
        if int(epochs) != epochs or epochs < 0:
            raise ValueError(f"epochs must be a non-negative integer, got {epochs!r}.")
        verbose = 1 if verbose == "auto" else verbose
        pipelines, examples = self._train_pipelines(train_data, batch_size, shuffle_buffer)
        steps = self._steps(examples, batch_size, steps_per_epoch)
        validation = None
        if validation_data is not None:
            validation = self._eval_dataset(validation_data, validation_batch_size or batch_size,
                                               "validation_data")
        if self._schedule is not None and steps is None:
            raise ValueError("lr_schedule needs the number of steps per epoch: pass steps_per_epoch.")
        self._steps_per_epoch.assign(steps or 1)
        self._schedule_epochs.assign(int(epochs))

        start = int(initial_epoch)
        if self._backup is not None and self._backup.restore():
            start = max(start, int(self._epoch.numpy()))
        callback_list = self._callback_list(callbacks, verbose, epochs, steps)
        if self._train_function is None:
            self._train_function = self._make_train_function()
        self.ensemble.stop_training = False
        callback_list.on_train_begin()
        epoch_logs = {}
        last_epoch = None
        for epoch in range(start, int(epochs)):
            epoch_logs = self._run_epoch(epoch, pipelines, steps, validation, callback_list)
            last_epoch = epoch
            if self.ensemble.stop_training:
                break
        if last_epoch is not None and self.grafting is not None and self.grafting.final_graft:
            self._graft(last_epoch)
        callback_list.on_train_end(logs=epoch_logs)
        return self.ensemble.history

    def _callback_list(self, callbacks, verbose, epochs, steps):
        callbacks = list(callbacks or [])
        for callback in callbacks:
            if _holds_graft_settings(callback) and callback.peers is None:
                raise ValueError("Pass the Grafting settings as GraftTrainer(grafting=Grafting(...)); the trainer "
                                 "grafts its models in a ring.")
        return keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                            model=self.ensemble, verbose=verbose, epochs=epochs, steps=steps)

    def _run_epoch(self, epoch, pipelines, steps, validation, callback_list):
        for tracker in self._trackers:
            tracker.reset()
        graft_logs = self._graft(epoch - 1) if epoch > 0 else self._idle_graft_logs()
        callback_list.on_epoch_begin(epoch)
        iterator = self._epoch_iterator(pipelines, epoch)
        step = 0
        while steps is None or step < steps:
            # Unknown steps (data that decide): one step per call, so the end of the data ends the epoch exactly.
            chunk = 1 if steps is None else min(self.steps_per_execution, steps - step)
            callback_list.on_train_batch_begin(step)
            try:
                logs = self._train_function(iterator, tf.constant(chunk))
            except (tf.errors.OutOfRangeError, StopIteration):
                break
            step += chunk
            callback_list.on_train_batch_end(step - 1, logs)
            if self.ensemble.stop_training:
                break
        logs = {name: value for name, value in self._results().items() if not name.endswith("_ensemble")}
        healthy = self._health([logs[f"loss_{k}"] for k in range(self.num_models)], epoch)
        logs["nonfinite_models"] = sum(not math.isfinite(logs[f"loss_{k}"]) for k in range(self.num_models))
        logs["unhealthy_models"] = healthy.count(False)
        self._healthy.assign(healthy)
        self._sync_replicas()
        logs.update(graft_logs)
        if validation is not None:
            logs.update({f"val_{name}": value for name, value in self._evaluate(validation, callback_list).items()})
        for k, optimizer in enumerate(self.optimizers):
            logs[f"learning_rate_{k}"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        self._epoch.assign(epoch + 1)
        if self._backup is not None:
            self._backup.save()
        callback_list.on_epoch_end(epoch, logs)
        return logs

    def _health(self, losses, epoch):
        """Which models are healthy after an epoch with these losses: finite, and within ``max_loss_ratio`` times
        the best loss (when that is positive). Warns about the others."""
        finite = [math.isfinite(loss) for loss in losses]
        best = min((loss for loss, ok in zip(losses, finite) if ok), default=None)
        limit = None
        if self.max_loss_ratio is not None and best is not None and best > 0:
            limit = self.max_loss_ratio * best
        healthy = [ok and (limit is None or loss <= limit) for loss, ok in zip(losses, finite)]
        if not all(finite):
            logging.warning("Epoch %d: models %s have a non-finite loss; they are not grafted into their peers and "
                            "the ensemble leaves them out.", epoch + 1, [k for k, ok in enumerate(finite) if not ok])
        exploded = [k for k, (ok, good) in enumerate(zip(finite, healthy)) if ok and not good]
        if exploded:
            logging.warning("Epoch %d: models %s have a loss above %g x the best (%.6g, max_loss_ratio): %s; they are "
                            "not grafted into their peers and the ensemble leaves them out.", epoch + 1, exploded,
                            self.max_loss_ratio, best, [losses[k] for k in exploded])
        return healthy

    def _idle_graft_logs(self):
        """Graft logs of an epoch that no round opened (none without grafting)."""
        return {} if self._rounds is None else self._rounds.idle_logs()

    def _graft(self, finished_epoch):
        """The round after (0-based) ``finished_epoch``, when one is due; returns its logs."""
        if self._rounds is None or not self.grafting.round_due(finished_epoch):
            return self._idle_graft_logs()
        with self.strategy.scope():
            logs = self._rounds(finished_epoch, self._healthy.numpy().tolist())
        if self._graft_verbose:
            how = "in a ring" if self._rounds.sources is None else "each from its own scion"
            keras_internals.print_msg(f"Grafting {self.num_models} models {how}, round after epoch "
                                      f"{finished_epoch + 1} (means over the models, layers summed): "
                                      f"{rounds_lib.round_summary(logs)}")
        return logs

    def _evaluate(self, distributed_data, callback_list=None):
        if self._test_function is None:
            self._test_function = self._make_test_function()
        for tracker in [*self._trackers, self._ensemble_tracker]:
            tracker.reset()
        if callback_list is not None:
            callback_list.on_test_begin()
        for step, batch in enumerate(distributed_data):
            if callback_list is not None:
                callback_list.on_test_batch_begin(step)
            self._test_function(batch)
            if callback_list is not None:
                callback_list.on_test_batch_end(step)
        logs = self._results()
        if callback_list is not None:
            callback_list.on_test_end(logs)
        return logs

    def evaluate(self, data, batch_size=None):
        """Loss and metrics per model (``loss_0``), their mean (``loss``) and the ensemble's (``loss_ensemble``).

        ``data`` as ``validation_data`` in :meth:`fit`. The ensemble averages the models' probabilities.
        """
        return self._evaluate(self._eval_dataset(data, batch_size, "evaluate data"))

    def predict(self, x, ensemble=True, batch_size=32):
        """Predictions for ``x`` (arrays, or a dataset of x or of (x, y), batched or not).

        Returns the ensemble's mean probabilities, or with ``ensemble=False`` a list of each model's outputs.
        """
        dataset = x if isinstance(x, tf.data.Dataset) else tf.data.Dataset.from_tensor_slices(x)
        spec = dataset.element_spec
        if isinstance(spec, tuple) and len(tf.nest.flatten(spec)) > len(self.models[0].inputs):
            dataset = dataset.map(lambda inputs, *targets: inputs)  # (x, y) elements: keep x.
        if not self._inputs_batched(dataset.element_spec, "predict data", dataset.element_spec):
            dataset = dataset.batch(batch_size)
        if self._predict_function is None:
            self._predict_function = tf.function(
                lambda inputs: [peer(inputs, training=False) for peer in self.models], reduce_retracing=True,
                autograph=False)
        outputs = [[] for _ in self.models]
        for inputs in dataset:
            for k, y_pred in enumerate(self._predict_function(inputs)):
                outputs[k].append(y_pred.numpy())
        outputs = [np.concatenate(chunks) for chunks in outputs]
        if not ensemble:
            return outputs
        probabilities = [keras.ops.convert_to_numpy(self.ensemble.probabilities(o)) for o in outputs]
        return keras.ops.convert_to_numpy(steps_lib.healthy_mean(probabilities, self._healthy.numpy()))
