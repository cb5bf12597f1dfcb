"""Experiments: settings -> trained models -> results, for the example scripts and the benchmarks.

A :class:`Config` names one experiment with the flags of ``examples/train.py`` (model, dataset, method, epochs,
batch, learning rate and schedule, seed, number of models...). :func:`resolve` fills in the method's defaults and
rejects settings that contradict each other (pure Python, no TensorFlow op); :func:`run` builds the library's
objects (``GraftTrainer``, ``Grafting``, ``Distillation``, ``RePr``, ``FilterStats``, ``keras_graft.models``,
``keras_graft.datasets``), trains and writes the results. Bad values (an unknown model, a grafting coefficient
out of range) fail in the library, with its own messages, before the first training step.

Runs go to folders named after their settings (:func:`run_name`); :class:`EpochRecord` records each epoch's
accuracy, invalid filters and peer distance for the benchmarks, which append their results as JSON lines
(:func:`append_jsonl`). Filter plots are in :mod:`keras_graft.experiment.plots`.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import keras_graft
from keras_graft import criteria
from keras_graft import datasets
from keras_graft import models
from keras_graft import strategies
from keras_graft.shared_directory import write_atomically

METHODS = ("baseline", "graft", "cultivate", "mutual", "repr", "ensemble")
SOURCES = ("external", "internal", "noise")
SCHEDULES = ("step", "cosine", "constant")
CRITERIA = ("entropy", "l1", "bn_scale")
LEVELS = ("layer", "filter")
REPR_UNITS = ("epoch", "step")
PROTOCOLS = ("default", "reference")
THRESHOLDS = (0.1, 0.01)
RESULTS_FILE = "results.json"
LOG_CSV = "log.csv"

METHOD_HELP = {
    "baseline": "one model, plain training",
    "graft": "N models grafting in a ring every epoch (or a scion from inside each model, --source)",
    "cultivate": "grafting + knowledge distillation from a frozen teacher (--teacher)",
    "mutual": "N models distilling from each other (deep mutual learning), no grafting",
    "repr": "RePr: drop the most overlapping filters, train without them, re-initialise them orthogonally",
    "ensemble": "N independent models (the fair baseline for grafting; reports their ensemble)",
}

_GRAFT_METHODS = ("graft", "cultivate")
_DISTILL_METHODS = ("cultivate", "mutual")


class ConfigError(ValueError):
    """Settings that contradict each other, or an output folder that holds another run."""


class ScriptError(SystemExit):
    """Ends a script with one line, ``<script>: error: <message>``, on stderr and exit status 1.

    (absl's ``app.UsageError`` would print every flag's help before the message.)
    """

    def __init__(self, script, message):
        super().__init__(f"{script}: error: {message}")


@dataclasses.dataclass
class Config:
    """One experiment. None means "not given": :func:`resolve` fills the method's default or rejects it."""

    method: str = "baseline"
    protocol: str = "default"
    model: str = "resnet32"
    width: int = None
    dataset: str = "cifar10"
    data_dir: str = None
    image_size: int = None
    num_models: int = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    schedule: str = "step"
    lr_step_epochs: int = 60
    lr_spread: bool = None
    weight_decay: float = 5e-4
    # Grafting (graft, cultivate).
    criterion: str = None
    level: str = None
    a: float = None
    c: float = None
    graft_every: int = None
    source: str = None
    threshold: float = None
    sigma_decay: float = None
    # Distillation (cultivate, mutual).
    teacher: str = None
    temperature: float = None
    distill_weight: float = None
    # RePr.
    repr_s1: int = None
    repr_s2: int = None
    repr_ratio: float = None
    repr_cycles: int = None
    repr_unit: str = None
    # Runtime.
    strategy: str = "default"
    seed: int = 0
    train_subset: int = None
    test_subset: int = None
    val_subset: int = None
    steps_per_epoch: int = None
    validate: bool = True
    output: str = None
    backup_dir: str = None
    log_dir: str = None
    tensorboard: bool = True
    save_model: str = None

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A Config from a results JSON's ``config`` (fields it does not know are dropped, missing ones default)."""
        return cls(**{key: value for key, value in values.items() if key in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------------------
# Resolving a config (pure Python)
# ---------------------------------------------------------------------------------------------------------------

_GRAFT_FIELDS = ("criterion", "level", "a", "c", "graft_every", "source", "threshold", "sigma_decay")
_DISTILL_FIELDS = ("teacher", "temperature", "distill_weight")
_REPR_FIELDS = ("repr_s1", "repr_s2", "repr_ratio", "repr_cycles", "repr_unit")

# fxmeng/filter-grafting, grafting_cifar/grafting.py: its defaults (--difflr on, no --cos), 2 models.
REFERENCE_PROTOCOL = {"num_models": 2, "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                      "schedule": "step", "lr_step_epochs": 60, "lr_spread": True, "weight_decay": 5e-4,
                      "source": "external", "criterion": "entropy", "level": "layer", "a": 0.4, "c": 500.0,
                      "graft_every": 1}


def _given(cfg, names):
    return [f"--{name}" for name in names if getattr(cfg, name) is not None]


def _choice(value, flag, choices):
    if value not in choices:
        raise ConfigError(f"Unknown --{flag}={value!r}; valid: {', '.join(choices)}.")


def _apply_reference_protocol(cfg):
    """--protocol=reference: every setting of the reference's grafting run; a flag that contradicts one fails."""
    if cfg.method != "graft":
        raise ConfigError(f"--protocol=reference reproduces the reference's grafting run: use --method=graft, not "
                          f"--method={cfg.method}.")
    defaults = Config()
    for key, value in REFERENCE_PROTOCOL.items():
        given = getattr(cfg, key)
        if given != getattr(defaults, key) and given != value:
            raise ConfigError(f"--protocol=reference sets --{key}={value!r}; got --{key}={given!r}. Drop one of "
                              "the two.")
        setattr(cfg, key, value)


def _resolve_grafting(cfg):
    cfg.source = "external" if cfg.source is None else cfg.source
    _choice(cfg.source, "source", SOURCES)
    if cfg.source == "external":
        scion_flags = _given(cfg, ("threshold", "sigma_decay"))
        if scion_flags:
            raise ConfigError(f"{', '.join(scion_flags)} set the scion of --source=internal|noise; "
                              "--source=external grafts another network's weights.")
        cfg.level = "layer" if cfg.level is None else cfg.level
        cfg.criterion = cfg.criterion or ("entropy" if cfg.level == "layer" else "bn_scale")
        cfg.a = 0.4 if cfg.a is None else cfg.a
        cfg.c = 500.0 if cfg.c is None else cfg.c
    else:  # The mixing settings stay None, so that resolve(resolve(cfg)) == resolve(cfg).
        mixing = _given(cfg, ("criterion", "level", "a", "c"))
        if mixing:
            raise ConfigError(f"{', '.join(mixing)} set how peer networks mix (--source=external); "
                              f"--source={cfg.source} adds a scion from inside each model instead (see "
                              "--threshold).")
        if cfg.sigma_decay is not None and cfg.source != "noise":
            raise ConfigError(f"--sigma_decay is for --source=noise, not --source={cfg.source}.")
        cfg.threshold = 0.1 if cfg.threshold is None else cfg.threshold
        if cfg.source == "noise":
            cfg.sigma_decay = 0.9 if cfg.sigma_decay is None else cfg.sigma_decay
    cfg.graft_every = 1 if cfg.graft_every is None else cfg.graft_every


def _resolve_num_models(cfg):
    method = cfg.method
    peers_needed = method in ("mutual", "ensemble") or (method in _GRAFT_METHODS and cfg.source == "external")
    if method == "baseline":
        if cfg.num_models not in (None, 1):
            raise ConfigError(f"--method=baseline trains one model, got --num_models={cfg.num_models}; use "
                              "--method=ensemble for independent models or --method=graft for grafting.")
        cfg.num_models = 1
    elif peers_needed:
        cfg.num_models = 2 if cfg.num_models is None else cfg.num_models
        if cfg.num_models < 2:
            what = {"graft": "grafting between networks (--source=external) needs peers",
                    "cultivate": "cultivation grafts between networks (--source=external) and needs peers",
                    "mutual": "mutual learning needs peers", "ensemble": "an ensemble needs models"}[method]
            raise ConfigError(f"--method={method} with --num_models={cfg.num_models}: {what}; use "
                              "--num_models=2 or more" + (" or --method=baseline" if method != "graft" else
                                                          ", --method=baseline, or --source=internal|noise") + ".")
    else:
        cfg.num_models = 1 if cfg.num_models is None else cfg.num_models
    if cfg.lr_spread and cfg.num_models < 2:
        raise ConfigError("--lr_spread spreads the initial learning rates over several models; with one model it "
                          "does nothing. Drop it or use --num_models=2 or more.")
    if cfg.lr_spread is None:  # The reference's default (--difflr) wherever networks graft each other.
        cfg.lr_spread = method in _GRAFT_METHODS and cfg.source == "external" and cfg.num_models >= 2


def resolve(cfg):
    """A copy of ``cfg`` with the method's defaults filled in; raises ConfigError on contradictory settings.

    Runs no TensorFlow op and checks no value the library checks (those fail in :func:`run`, before training).
    The default output folder is named after every setting that changes the run (:func:`run_name`).
    """
    cfg = dataclasses.replace(cfg)
    _choice(cfg.method, "method", METHODS)
    _choice(cfg.protocol, "protocol", PROTOCOLS)
    if cfg.protocol == "reference":
        _apply_reference_protocol(cfg)
    if cfg.lr_step_epochs != 60 and cfg.schedule != "step":
        raise ConfigError(f"--lr_step_epochs is for --schedule=step, not --schedule={cfg.schedule}.")
    method = cfg.method
    # Settings that belong to other methods.
    if method not in _GRAFT_METHODS and _given(cfg, _GRAFT_FIELDS):
        raise ConfigError(f"{', '.join(_given(cfg, _GRAFT_FIELDS))} set grafting, which --method={method} does not "
                          "do; use --method=graft or --method=cultivate.")
    if method != "repr" and _given(cfg, _REPR_FIELDS):
        raise ConfigError(f"{', '.join(_given(cfg, _REPR_FIELDS))} only apply to --method=repr, not "
                          f"--method={method}.")
    if cfg.teacher is not None and method != "cultivate":
        raise ConfigError(f"--teacher is only used by --method=cultivate (grafting + distillation from the "
                          f"teacher), not --method={method}.")
    if method not in _DISTILL_METHODS and _given(cfg, _DISTILL_FIELDS):
        raise ConfigError(f"{', '.join(_given(cfg, _DISTILL_FIELDS))} only apply to --method=cultivate or "
                          f"--method=mutual, not --method={method}.")
    if method in _GRAFT_METHODS:
        _resolve_grafting(cfg)
    _resolve_num_models(cfg)
    if method in _DISTILL_METHODS:
        cfg.temperature = 2.0 if cfg.temperature is None else cfg.temperature
        cfg.distill_weight = 1.0 if cfg.distill_weight is None else cfg.distill_weight
    if method == "cultivate" and not cfg.teacher:
        raise ConfigError("--method=cultivate distils from a teacher: pass --teacher=path/to/teacher.keras (train "
                          "one with --method=baseline --save_model=path/to/teacher.keras).")
    if method == "repr":
        for key, default in (("repr_s1", 20), ("repr_s2", 10), ("repr_cycles", 3), ("repr_ratio", 0.3),
                             ("repr_unit", "epoch")):
            setattr(cfg, key, default if getattr(cfg, key) is None else getattr(cfg, key))
    if cfg.save_model is not None and not cfg.save_model.endswith(".keras"):  # Keras would fail after training.
        raise ConfigError(f"--save_model must end in .keras (Keras' model format), got {cfg.save_model!r}.")
    if cfg.output is None:
        cfg.output = os.path.join("runs", run_name(cfg), RESULTS_FILE)
    if cfg.log_dir is None:
        cfg.log_dir = os.path.join(os.path.dirname(cfg.output) or ".", "logs")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Telling runs apart: output folders, overwrite checks, labels, warnings
# ---------------------------------------------------------------------------------------------------------------

#: Settings that say where files go, not what the run does.
LOCATION_FIELDS = ("output", "log_dir", "tensorboard", "backup_dir", "save_model", "data_dir")
#: Settings that the start of a run's name (method, network label, dataset) already says.
_NAMED_FIELDS = ("method", "model", "width", "dataset")
_MAX_NAME = 150


def run_settings(cfg):
    """{setting: value} of everything that changes what a run does (every field but :data:`LOCATION_FIELDS`)."""
    values = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    defaults = Config().to_dict()
    return {key: values.get(key, defaults[key]) for key in defaults if key not in LOCATION_FIELDS}


def _method_defaults(cfg):
    """The resolved config of ``cfg``'s method, network and dataset with every other setting at its default."""
    base = Config(method=cfg.method, model=cfg.model, width=cfg.width, dataset=cfg.dataset, output=os.devnull,
                  log_dir=os.devnull, source=cfg.source if cfg.method in _GRAFT_METHODS else None,
                  teacher=cfg.teacher if cfg.method == "cultivate" else None)
    return resolve(base)


def changed_settings(cfg):
    """[(setting, value)] of a resolved config where it differs from its method's defaults, in field order.

    A scion source (--source=noise|internal) and a teacher count as changes; a scion's own settings are compared
    with the source's defaults."""
    defaults = run_settings(_method_defaults(cfg))
    if cfg.method in _GRAFT_METHODS:
        defaults["source"] = "external"
    defaults["teacher"] = None  # The teacher has no default: it always tells cultivation runs apart.
    return [(key, value) for key, value in run_settings(cfg).items() if value != defaults[key]]


def _setting_text(key, value):
    """A setting as a short token: epochs=3, lr=0.05, lr_spread, no_validate, teacher=<file stem>_<path hash>."""
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if key == "teacher" and value:
        stem = os.path.basename(str(value)).split(".")[0]
        digest = hashlib.sha1(os.path.abspath(str(value)).encode()).hexdigest()[:6]
        return f"teacher={stem}_{digest}"
    if isinstance(value, float):
        return f"{key}={value:g}"
    return f"{key}={value}"


def model_label(cfg):
    """The network's name with its width where one is given: resnet32, resnet8_w4."""
    return cfg.model + (f"_w{cfg.width}" if cfg.width is not None else "")


def run_name(cfg):
    """The default folder name of a resolved config: ``<method>_<network>_<dataset>``, then every other setting
    that differs from the method's defaults (``graft_resnet20_w8_fashion_mnist_local-epochs=2-graft_every=3``); a
    hash of those settings instead when the name would be long. Two configs that run differently never share it."""
    base = f"{cfg.method}_{model_label(cfg)}_{cfg.dataset}"
    changed = [(key, value) for key, value in changed_settings(cfg) if key not in _NAMED_FIELDS]
    if not changed:
        return base
    tokens = [re.sub(r"[^\w.+=-]", "_", _setting_text(key, value)) for key, value in changed]
    name = "-".join([base] + tokens)
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{base}-{digest}"


def check_output(cfg):
    """Raises ConfigError when ``cfg.output`` holds the results of a run with other settings (naming both)."""
    if not os.path.exists(cfg.output):
        return
    try:
        with open(cfg.output) as f:
            previous = json.load(f)["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg.output} exists but is not the results of a train.py run ({type(e).__name__}: {e}); "
                          "pass another --output or delete it.") from e
    ours, theirs = run_settings(cfg), run_settings(previous)
    differences = [key for key in ours if ours[key] != theirs[key]]
    if not differences:
        return
    try:
        theirs_text = describe(Config.from_dict(previous))
    except (TypeError, ValueError, KeyError):
        theirs_text = "(unreadable configuration)"
    changes = ", ".join(f"--{key}={theirs[key]!r} there, {ours[key]!r} here" for key in differences)
    raise ConfigError(
        f"{os.path.dirname(os.path.abspath(cfg.output))} holds a run of another configuration; this run would "
        f"overwrite it.\n  there: {theirs_text}\n  here:  {describe(cfg)}\n  differences: {changes}.\nPass "
        "another --output (or leave --output out: the default folder is named after the settings), or delete the "
        "old folder.")


def graft_rounds(cfg):
    """How many graft (or scion) rounds a resolved config runs; None for methods that do not graft."""
    if cfg.method not in _GRAFT_METHODS:
        return None
    timing = keras_graft.GraftConfig(every_n_epochs=cfg.graft_every)  # between epochs, none after the final one
    return sum(1 for epoch in range(cfg.epochs - 1) if timing.round_due(epoch))


def run_warnings(cfg, steps_per_epoch=None):
    """Messages about a resolved config that will run but not do what its method is for."""
    messages = []
    if graft_rounds(cfg) == 0:
        what = "no graft will happen" if cfg.source == "external" else "no scion will be grafted"
        messages.append(
            f"--graft_every={cfg.graft_every} with --epochs={cfg.epochs}: {what}. A round runs between two epochs, "
            f"after epochs {cfg.graft_every}, {2 * cfg.graft_every}, ..., and none follows the final epoch; use "
            f"--epochs={cfg.graft_every + 1} or more, or a smaller --graft_every.")
    if cfg.method == "repr":
        units = cfg.epochs * (steps_per_epoch or 0) if cfg.repr_unit == "step" else cfg.epochs
        if (cfg.repr_unit == "epoch" or steps_per_epoch) and units <= cfg.repr_s1:
            messages.append(
                f"--repr_s1={cfg.repr_s1} {cfg.repr_unit}s of full training come before RePr's first drop, but the "
                f"run has {units} {cfg.repr_unit}s: RePr will drop no filter. Use a smaller --repr_s1 or more "
                "--epochs.")
    return messages


def run_labels(configs):
    """Labels telling runs apart: each run's method, then the settings in which the runs differ (where they
    differ from the method's defaults): ``graft lr_spread``, ``graft graft_every=3``."""
    configs = [resolve(c if isinstance(c, Config) else Config.from_dict(c)) for c in configs]
    settings = [run_settings(c) for c in configs]
    varying = {key for key in settings[0] if any(s[key] != settings[0][key] for s in settings)}
    labels = []
    for cfg in configs:
        tokens = [cfg.method]
        if varying & {"model", "width"}:
            tokens.append(model_label(cfg))
        if "dataset" in varying:
            tokens.append(cfg.dataset)
        tokens += [_setting_text(key, value) for key, value in changed_settings(cfg)
                   if key in varying and key not in _NAMED_FIELDS]
        labels.append(" ".join(tokens))
    return labels


def describe(cfg):
    """One line saying what the experiment does."""
    n = cfg.num_models
    what = {
        "baseline": "1 model",
        "ensemble": f"{n} independent models + their ensemble",
        "mutual": f"{n} models, mutual distillation (T={cfg.temperature})",
        "repr": f"{n} model{'s' if n > 1 else ''} + RePr (S1={cfg.repr_s1}, S2={cfg.repr_s2} {cfg.repr_unit}s, "
                f"p={cfg.repr_ratio}, {cfg.repr_cycles} cycles)",
    }.get(cfg.method)
    if what is None:
        if cfg.source == "external":
            what = (f"{n} models grafting in a ring ({cfg.criterion}, {cfg.level} level, a={cfg.a:g}, c={cfg.c:g}, "
                    f"every {cfg.graft_every} epoch{'s' if cfg.graft_every > 1 else ''})")
        else:
            what = f"{n} model{'s' if n > 1 else ''}, {cfg.source} scion into filters with L1 < {cfg.threshold:g}"
        if cfg.method == "cultivate":
            what += f" + distillation from {cfg.teacher} (T={cfg.temperature})"
    schedule = {"step": f"x0.1 every {cfg.lr_step_epochs} epochs", "cosine": "cosine", "constant": "constant"}
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    return (f"{cfg.method}: {what}; {model_label(cfg)} on {cfg.dataset}, {epochs}, batch {cfg.batch_size}, "
            f"SGD lr {cfg.lr:g}{' spread' if cfg.lr_spread else ''} ({schedule.get(cfg.schedule, cfg.schedule)}), "
            f"weight decay {cfg.weight_decay:g}")


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSpec:
    """What rebuilds a run's network (for the plots): ``keras_graft.models.get(name, width=..., ...)``; stored in
    the results JSON as ``"model_spec"``."""

    name: str
    width: int = None
    num_classes: int = 10
    input_shape: tuple = (32, 32, 3)
    weight_decay: float = 0.0

    @property
    def label(self):
        return self.name + (f"_w{self.width}" if self.width is not None else "")

    @classmethod
    def from_label(cls, label, **fields):
        """The spec a ``label`` names: ``resnet8_w8`` is ``resnet8`` of width 8, ``wrn28_10`` is itself."""
        name, marker, width = label.rpartition("_w")
        return cls(name, int(width), **fields) if marker and width.isdigit() else cls(label, **fields)

    def build(self):
        extra = {} if self.width is None else {"width": self.width}
        return models.get(self.name, num_classes=self.num_classes, input_shape=tuple(self.input_shape),
                          weight_decay=self.weight_decay, **extra)

    def to_dict(self):
        return {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, values):
        values = {key: value for key, value in values.items() if key in cls.__dataclass_fields__}
        return cls(**{**values, "input_shape": tuple(values["input_shape"])})


def model_spec(cfg, dataset_info=None):
    """The ModelSpec of ``cfg``: its network for the dataset's images and classes (CIFAR's without one)."""
    shape, classes = ((32, 32, 3), 10) if dataset_info is None else (dataset_info.input_shape,
                                                                     dataset_info.num_classes)
    return ModelSpec(cfg.model, cfg.width, classes, tuple(shape), cfg.weight_decay)


def load_trained(weights_path, spec):
    """A model built from ``spec`` (a ModelSpec) with the weights of ``weights_path``."""
    model = spec.build()
    model.load_weights(weights_path)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


class EpochLogger(keras.callbacks.Callback):
    """One readable line per epoch through ``log``: loss, accuracies, ensemble, the graft that opened the epoch
    (``graft |a-0.5|``: ``graft_alpha_spread``, ``peer dist``: ``graft_peer_distance``; see keras_graft.grafting),
    invalid filters.

    ``val_images``: how many test images the per-epoch test accuracy uses, when that is a subset of the final
    evaluation's (the line then says so).
    """

    def __init__(self, log, epochs, num_models, prefix="", val_images=None):
        super().__init__()
        self.log = log
        self.epochs = epochs
        self.num_models = num_models
        self.prefix = prefix
        self.val_images = val_images
        self.seconds = []
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        self.seconds.append(seconds)
        logs = logs or {}
        n = self.num_models

        def per_model(key):
            values = [logs.get(f"{key}_{k}") for k in range(n)] if n > 1 else [logs.get(key)]
            if any(v is None for v in values):
                return None
            return " ".join(f"{v:.4f}" for v in values)

        parts = [f"{self.prefix}epoch {epoch + 1}/{self.epochs}", f"loss {logs.get('loss', float('nan')):.4f}"]
        train_acc = per_model("accuracy")
        if train_acc:
            parts.append(f"acc {train_acc}")
        val_acc = per_model("val_accuracy")
        if val_acc:
            which = f" (first {self.val_images} imgs)" if self.val_images else ""
            parts.append(f"test acc{which} {val_acc}" + (f" (ensemble {logs['val_accuracy_ensemble']:.4f})"
                                                         if n > 1 and "val_accuracy_ensemble" in logs else ""))
        if "graft_alpha_spread" in logs and "scion_filters" not in logs:
            if logs.get("graft_layers", 0):
                parts.append(f"graft |a-0.5| {logs['graft_alpha_spread']:.3f} peer dist "
                             f"{logs['graft_peer_distance']:.3f}")
            else:
                parts.append("no graft")
        if "scion_filters" in logs:
            parts.append(f"scion filters {logs['scion_filters']}")
        if "repr_phase" in logs or "repr_phase_0" in logs:
            phase = logs.get("repr_phase", logs.get("repr_phase_0"))
            dropped = logs.get("repr_dropped", logs.get("repr_dropped_0"))
            parts.append(f"repr phase {('full', 'pruned', 'done')[int(phase)]} dropped {dropped}")
        invalid = per_model("invalid_filters_0.1")
        if invalid:
            parts.append("invalid<0.1 " + " ".join(str(int(float(v))) for v in invalid.split()))
        parts.append(f"{seconds:.1f} s")
        self.log(" | ".join(parts))


class EpochRecord(keras.callbacks.Callback):
    """One row per epoch of a GraftTrainer's models, measured before that epoch's graft, in :attr:`rows`.

    A row holds, per model: the learning rate, the training loss, the validation accuracy (named ``accuracy_key``,
    and ``<accuracy_key>_ensemble``), the invalid filters below each of ``thresholds`` (``invalid_0.1``...) and
    the coefficient of the graft that opened the epoch (``graft_alpha``, 1 without one); with ``peer_distance``
    and 2+ models also ``peer_distance``, ||W_0 - W_1|| / ||W_0|| over all weights; and the epoch's seconds.
    With a ``path`` the rows are also written there (atomically) after every epoch and read back on creation, so
    that a run resumed from a backup keeps the rows of the epochs it does not rerun.
    """

    def __init__(self, trainer, label, path=None, accuracy_key="test_accuracy", peer_distance=True,
                 thresholds=THRESHOLDS):
        super().__init__()
        self.trainer = trainer
        self.label = label
        self.path = path
        self.accuracy_key = accuracy_key
        self.peer_distance = peer_distance
        self.thresholds = tuple(thresholds)
        self.stats = keras_graft.FilterStats(thresholds=list(self.thresholds))
        # FilterStats names its counts invalid_filters_<threshold>, or invalid_filters for a single threshold.
        self._stat_keys = ([f"invalid_filters_{t:g}" for t in self.thresholds] if len(self.thresholds) > 1
                           else ["invalid_filters"])
        self.rows = []
        if path and os.path.exists(path):
            with open(path) as f:
                self.rows = json.load(f)
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self.rows = [row for row in self.rows if row["epoch"] <= epoch]

    def on_epoch_end(self, epoch, logs=None):
        n = self.trainer.num_models
        stats = [self.stats.measure(model) for model in self.trainer.models]
        accuracy = self.accuracy_key
        row = {
            "epoch": epoch + 1, "seconds": time.perf_counter() - self._start,
            "learning_rate": [logs[f"learning_rate_{k}"] for k in range(n)],
            "train_loss": [logs[f"loss_{k}"] for k in range(n)],
            accuracy: [logs[f"val_accuracy_{k}"] for k in range(n)],
            f"{accuracy}_ensemble": logs["val_accuracy_ensemble"],
            **{f"invalid_{t:g}": [s[key] for s in stats] for t, key in zip(self.thresholds, self._stat_keys)},
            "graft_alpha": [logs.get(f"graft_alpha_{k}", 1.0) for k in range(n)],
        }
        if self.peer_distance and n > 1:
            own, peer = (np.concatenate([w.ravel() for w in m.get_weights()]) for m in self.trainer.models[:2])
            row["peer_distance"] = float(np.linalg.norm(own - peer) / np.linalg.norm(own))
        self.rows.append(row)
        if self.path:
            write_atomically(os.path.abspath(self.path), json.dumps(self.rows).encode())
        first = f"invalid_{self.thresholds[0]:g}"
        logging.info("%s epoch %d: %s %s (ensemble %.4f), %s %s, lr %.3g%s (%.0f s)", self.label, epoch + 1,
                     accuracy.replace("_", " "), [round(a, 4) for a in row[accuracy]], row[f"{accuracy}_ensemble"],
                     first.replace("_", "<"), row[first], row["learning_rate"][-1],
                     f", distance {row['peer_distance']:.3f}" if "peer_distance" in row else "", row["seconds"])


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tf.Tensor):
        return value.numpy().tolist()
    return str(value)


def write_json(path, data):
    """Writes ``data`` to ``path`` as indented JSON, atomically (a temporary file renamed into place)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, (json.dumps(data, indent=1, default=_json_default) + "\n").encode())


def append_jsonl(path, record):
    """Appends ``record`` to the JSON-lines file ``path`` as one line (``json.dumps(record)``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of the JSON-lines file ``path`` ([] when it does not exist), skipping a line cut short by a
    killed writer."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


# ---------------------------------------------------------------------------------------------------------------
# One experiment
# ---------------------------------------------------------------------------------------------------------------


def _data(cfg, dsinfo, strategy):
    """(train dataset function for GraftTrainer, steps per epoch, test dataset, validation dataset).

    Reads the data now, so that missing data fails before training.
    """
    replicas = strategy.num_replicas_in_sync
    # Each (model, epoch) gets its own order and augmentation; a resumed epoch sees the same batches again.
    train_fn = datasets.per_model_dataset_fn(
        cfg.dataset, batch_size=cfg.batch_size, base_seed=int(cfg.seed) * 100_003, subset=cfg.train_subset,
        image_size=cfg.image_size, data_dir=cfg.data_dir, drop_remainder=replicas > 1)
    try:
        batches = int(train_fn(0).cardinality())  # Reads the training split (shared by every model's pipeline).
        eval_batch = max(256, cfg.batch_size) // replicas * replicas
        test = datasets.load(cfg.dataset, dsinfo.test_split, batch_size=eval_batch, subset=cfg.test_subset,
                             image_size=cfg.image_size, data_dir=cfg.data_dir)
        validation = test
        if cfg.val_subset is not None and cfg.val_subset != cfg.test_subset:
            validation = datasets.load(cfg.dataset, dsinfo.test_split, batch_size=eval_batch, subset=cfg.val_subset,
                                       image_size=cfg.image_size, data_dir=cfg.data_dir)
    except datasets.DatasetUnavailableError as e:  # Reworded for the settings a Config has.
        raise datasets.DatasetUnavailableError(e.message_for(data_dir="--data_dir=DIR", download=None)) from e
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch > batches:
        raise ConfigError(f"--steps_per_epoch={cfg.steps_per_epoch} but the training data give {batches} batches "
                          f"of {cfg.batch_size} per epoch.")
    return train_fn, cfg.steps_per_epoch or batches, test, validation


def _schedule(cfg):
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "step":
        return {"name": "step", "every_epochs": cfg.lr_step_epochs, "factor": 0.1}
    return cfg.schedule


def _source(cfg):
    """The information source of a graft method: None (the models' ring) or a scion (one copy per model)."""
    if cfg.source == "noise":
        return keras_graft.NoiseScion(threshold=cfg.threshold, sigma_decay=cfg.sigma_decay, seed=cfg.seed)
    if cfg.source == "internal":
        return keras_graft.InternalScion(threshold=cfg.threshold)
    return None


def _trainer(cfg, spec, strategy):
    kwargs = {}
    if cfg.method in _GRAFT_METHODS and cfg.source == "external":
        kwargs["grafting"] = keras_graft.GraftConfig(criterion=cfg.criterion, a=cfg.a, c=cfg.c, level=cfg.level,
                                                     every_n_epochs=cfg.graft_every)
    elif cfg.method in _GRAFT_METHODS:  # a scion per model, with the ring's timing
        kwargs["grafting"] = keras_graft.Grafting(_source(cfg), every_n_epochs=cfg.graft_every)
    if cfg.method in _DISTILL_METHODS:
        teachers = [cfg.teacher] if cfg.method == "cultivate" else []
        kwargs["distillation"] = keras_graft.Distillation(teachers, temperature=cfg.temperature,
                                                          weight=cfg.distill_weight, mutual=cfg.method == "mutual")
    return keras_graft.GraftTrainer(
        spec.build, num_models=cfg.num_models, optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
        strategy=strategy, lr_spread=cfg.lr_spread, lr_schedule=_schedule(cfg), seed=cfg.seed,
        backup_dir=cfg.backup_dir, data_order="shared" if cfg.method == "mutual" else "per_model", **kwargs)


def _repr_callback(cfg):
    """The RePr callback of the repr method (it acts on the trainer's models, read from its PeerEnsemble)."""
    if cfg.method != "repr":
        return None
    return keras_graft.RePr(s1=cfg.repr_s1, s2=cfg.repr_s2, prune_ratio=cfg.repr_ratio, cycles=cfg.repr_cycles,
                            unit=cfg.repr_unit, seed=cfg.seed)


def run(cfg, log=logging.info, strategy=None, overwrite=False):
    """Trains the experiment ``cfg`` and returns its results (also written to ``cfg.output`` as JSON).

    Everything that can fail on bad input fails before the first training step: a ConfigError for contradictory
    settings or an output folder that holds a run of another configuration (unless ``overwrite``), the library's
    own errors (ValueError, DatasetUnavailableError) for values it rejects. Settings that will run but not do
    what the method is for (no graft round at all) are logged as warnings.
    ``strategy``: an existing tf.distribute strategy instead of creating ``cfg.strategy``.
    """
    cfg = resolve(cfg)
    if strategy is None:
        strategy = strategies.get(cfg.strategy)  # First: MultiWorkerMirroredStrategy must exist before any op.
    chief = strategy.extended.should_checkpoint  # The process that writes files, as GraftTrainer's backups.
    if chief and not overwrite:
        check_output(cfg)
    dsinfo = datasets.info(cfg.dataset, image_size=cfg.image_size)
    spec = model_spec(cfg, dsinfo)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    log(describe(cfg))
    log(f"Output folder: {out_dir}")

    trainer = _trainer(cfg, spec, strategy)
    repr_cb = _repr_callback(cfg)
    train_fn, steps, test, validation = _data(cfg, dsinfo, strategy)
    for message in run_warnings(cfg, steps):
        logging.warning(message)
    filters_per_model = criteria.invalid_filters(trainer.models[0], THRESHOLDS[0]).total
    examples = min(cfg.train_subset or dsinfo.train_size, dsinfo.train_size)
    log(f"{spec.label}: {trainer.models[0].count_params():,} weights, {filters_per_model} filters per model; "
        f"{examples} training images, {steps} steps per epoch, {strategy.num_replicas_in_sync} replica(s).")

    test_size = min(cfg.test_subset or dsinfo.test_size, dsinfo.test_size)
    val_size = min(cfg.val_subset or test_size, dsinfo.test_size)
    progress = EpochLogger(log, cfg.epochs, cfg.num_models, val_images=val_size if val_size < test_size else None)
    callbacks = [keras_graft.FilterStats(thresholds=list(THRESHOLDS)), *([repr_cb] if repr_cb else []), progress]
    log_csv = None
    if chief:
        os.makedirs(cfg.log_dir, exist_ok=True)
        log_csv = os.path.join(cfg.log_dir, LOG_CSV)
        resuming = bool(cfg.backup_dir and tf.train.latest_checkpoint(cfg.backup_dir))
        callbacks.append(keras.callbacks.CSVLogger(log_csv, append=resuming))
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
            callbacks.append(keras.callbacks.TensorBoard(cfg.log_dir, write_graph=False, profile_batch=0))
        elif cfg.tensorboard:
            logging.warning("TensorBoard is not installed (pip install tensorboard): writing %s only.", log_csv)

    start = time.perf_counter()
    history = trainer.fit(train_fn, epochs=cfg.epochs, steps_per_epoch=steps,
                          validation_data=validation if cfg.validate else None, callbacks=callbacks, verbose=0)
    fit_seconds = time.perf_counter() - start
    evaluation = trainer.evaluate(test)

    results = {
        "method": cfg.method, "model": spec.label, "dataset": cfg.dataset, "num_models": cfg.num_models,
        "description": describe(cfg), "config": cfg.to_dict(), "model_spec": spec.to_dict(),
        "test_accuracy": [evaluation[f"accuracy_{k}"] for k in range(cfg.num_models)],
        "test_loss": [evaluation[f"loss_{k}"] for k in range(cfg.num_models)],
        "ensemble_accuracy": evaluation["accuracy_ensemble"], "ensemble_loss": evaluation["loss_ensemble"],
        "filters_per_model": filters_per_model, "invalid_filters": {}, "invalid_filters_per_layer": {},
        "train_examples": examples, "steps_per_epoch": steps, "epochs_run": len(progress.seconds),
        "fit_seconds": fit_seconds,
        "seconds_per_epoch": float(np.median(progress.seconds)) if progress.seconds else None,
        "history": {key: [float(v) for v in values] for key, values in (history.history or {}).items()},
        "weights": [], "saved_model": None, "log_csv": log_csv, "results": os.path.abspath(cfg.output),
    }
    results["mean_accuracy"] = float(np.mean(results["test_accuracy"]))
    for threshold in THRESHOLDS:
        reports = [criteria.invalid_filters(model, threshold) for model in trainer.models]
        results["invalid_filters"][f"{threshold:g}"] = [r.invalid for r in reports]
        results["invalid_filters_per_layer"][f"{threshold:g}"] = [
            {name: bad for name, bad, _ in r.per_layer} for r in reports]
    if repr_cb is not None:
        results["repr_events"] = [{key: value for key, value in event.items() if key != "indices"}
                                  for event in repr_cb.history]
    if chief:
        os.makedirs(out_dir, exist_ok=True)
        for k, model in enumerate(trainer.models):
            path = os.path.join(out_dir, f"model_{k}.weights.h5")
            model.save_weights(path)
            results["weights"].append(path)
        if cfg.save_model:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.save_model)), exist_ok=True)
            trainer.models[0].save(cfg.save_model)
            results["saved_model"] = os.path.abspath(cfg.save_model)
        write_json(cfg.output, results)
    return results


def format_table(runs, labels=None):
    """A plain-text table: one row per model of each run and one for each run's ensemble (2+ models).

    Columns: test accuracy (%), invalid filters at each threshold (L1 norm below it) out of the model's filters.
    """
    labels = labels or [r["method"] for r in runs]
    header = ["run", "model", "test acc. %"] + [f"invalid L1<{t:g}" for t in THRESHOLDS]
    rows = []
    for label, r in zip(labels, runs):
        total = r["filters_per_model"]
        for k, accuracy in enumerate(r["test_accuracy"]):
            rows.append([label, f"model {k}", f"{100 * accuracy:.2f}"]
                        + [f"{r['invalid_filters'][f'{t:g}'][k]} / {total}" for t in THRESHOLDS])
        if r["num_models"] > 1:
            rows.append([label, "ensemble", f"{100 * r['ensemble_accuracy']:.2f}"] + ["-"] * len(THRESHOLDS))
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    align = ["<", "<", ">"] + [">"] * len(THRESHOLDS)

    def line(row):
        return "  ".join(f"{str(cell):{a}{w}}" for cell, a, w in zip(row, align, widths))

    out = [line(header), "  ".join("-" * w for w in widths)]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            out.append("")
        out.append(line(row))
        previous = row[0]
    return "\n".join(out)
