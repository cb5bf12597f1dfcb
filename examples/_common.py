"""Shared code of the example scripts: one experiment (config -> trained models -> results), tables and plots.

``train.py`` fills a :class:`Config` from its flags, ``quickstart.py`` fills two of them directly; both call
:func:`run`. ``plot_filters.py`` and ``quickstart.py`` draw with :func:`plot_filters`. Nothing here defines absl
flags, so every script can import it.

A config is checked in two passes, both before any training:

* :func:`resolve` (pure Python, no TensorFlow op): names, numbers and flags that contradict each other; fills in
  the defaults that depend on the method. A setting left at None was not given; giving a setting that the method
  does not use (``--a`` with ``--method=baseline``) is an error rather than silently ignored.
* :func:`run` then creates the strategy (first: MultiWorkerMirroredStrategy must exist before any op), builds the
  models, loads the teacher and reads the data, turning every failure into a :class:`ConfigError`.
"""

import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import textwrap
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import keras_graft
from keras_graft import criteria
from keras_graft import datasets
from keras_graft import layouts
from keras_graft import models
from keras_graft import strategies
from keras_graft.trainer import GraftTrainer

METHODS = ("baseline", "graft", "cultivate", "mutual", "repr", "ensemble")
SOURCES = ("external", "internal", "noise")
SCHEDULES = ("step", "cosine", "constant")
CRITERIA = ("entropy", "l1", "bn_scale")
LEVELS = ("layer", "filter")
REPR_UNITS = ("epoch", "step")
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
    """A bad setting or a contradiction between settings, found before training."""


class ScriptError(SystemExit):
    """Ends a script on bad input with one line, ``<script>: error: <message>``, on stderr and exit status 1.

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
    depth: int = None
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


# ---------------------------------------------------------------------------------------------------------------
# Checking a config (pure Python)
# ---------------------------------------------------------------------------------------------------------------

_GRAFT_FIELDS = ("criterion", "level", "a", "c", "graft_every", "source", "threshold", "sigma_decay")
_DISTILL_FIELDS = ("teacher", "temperature", "distill_weight")
_REPR_FIELDS = ("repr_s1", "repr_s2", "repr_ratio", "repr_cycles", "repr_unit")


def _given(cfg, names):
    return [f"--{name}" for name in names if getattr(cfg, name) is not None]


def _positive_int(value, flag, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"--{flag} must be a positive integer, got {value!r}.")


PROTOCOLS = ("default", "reference")
# fxmeng/filter-grafting, grafting_cifar/grafting.py: its defaults (--difflr on, no --cos), 2 models.
REFERENCE_PROTOCOL = {"num_models": 2, "epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                      "schedule": "step", "lr_step_epochs": 60, "lr_spread": True, "weight_decay": 5e-4,
                      "source": "external", "criterion": "entropy", "level": "layer", "a": 0.4, "c": 500.0,
                      "graft_every": 1}


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


def resolve(cfg, check_files=True):
    """A copy of ``cfg`` with the method's defaults filled in; raises ConfigError on bad or contradictory settings.

    Runs no TensorFlow op. ``check_files=False`` skips the check that the teacher file exists (to compare the
    configs of old runs). The default output folder is named after every setting that changes the run
    (:func:`run_name`).
    """
    cfg = dataclasses.replace(cfg)
    if cfg.method not in METHODS:
        raise ConfigError(f"Unknown --method={cfg.method!r}; valid methods: {', '.join(METHODS)}.")
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown --protocol={cfg.protocol!r}; valid: {', '.join(PROTOCOLS)}.")
    if cfg.protocol == "reference":
        _apply_reference_protocol(cfg)
    if cfg.dataset not in datasets.NAMES:
        raise ConfigError(f"Unknown --dataset={cfg.dataset!r}; valid datasets: {', '.join(datasets.NAMES)}.")
    if cfg.strategy not in strategies.NAMES:
        raise ConfigError(f"Unknown --strategy={cfg.strategy!r}; valid: {', '.join(strategies.NAMES)}.")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"Unknown --schedule={cfg.schedule!r}; valid: {', '.join(SCHEDULES)}.")
    model_spec(cfg)  # Unknown model names, unsupported depths, --depth/--width where they do not apply.
    for flag in ("epochs", "batch_size", "lr_step_epochs"):
        _positive_int(getattr(cfg, flag), flag)
    for flag in ("train_subset", "test_subset", "val_subset", "steps_per_epoch", "image_size"):
        _positive_int(getattr(cfg, flag), flag, allow_none=True)
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr!r}.")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must lie in [0, 1), got {cfg.momentum!r}.")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        raise ConfigError(f"--weight_decay must be >= 0, got {cfg.weight_decay!r}.")
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

    # Grafting settings.
    if method in _GRAFT_METHODS:
        cfg.source = "external" if cfg.source is None else cfg.source
        if cfg.source not in SOURCES:
            raise ConfigError(f"Unknown --source={cfg.source!r}; valid: {', '.join(SOURCES)}.")
        if cfg.source == "external":
            scion_flags = _given(cfg, ("threshold", "sigma_decay"))
            if scion_flags:
                raise ConfigError(f"{', '.join(scion_flags)} set the scion of --source=internal|noise; "
                                  "--source=external grafts another network's weights.")
        else:
            mixing = _given(cfg, ("criterion", "level", "a", "c"))
            if mixing:
                raise ConfigError(f"{', '.join(mixing)} set how peer networks mix (--source=external); "
                                  f"--source={cfg.source} adds a scion from inside each model instead (see "
                                  "--threshold).")
            if cfg.sigma_decay is not None and cfg.source != "noise":
                raise ConfigError(f"--sigma_decay is for --source=noise, not --source={cfg.source}.")
            cfg.threshold = 0.1 if cfg.threshold is None else float(cfg.threshold)
            if not (cfg.threshold >= 0 and math.isfinite(cfg.threshold)):
                raise ConfigError(f"--threshold must be a finite number >= 0, got {cfg.threshold}.")
            if cfg.source == "noise":
                cfg.sigma_decay = 0.9 if cfg.sigma_decay is None else float(cfg.sigma_decay)
                if not 0 < cfg.sigma_decay < 1:
                    raise ConfigError(f"--sigma_decay must lie in (0, 1), got {cfg.sigma_decay}.")
        if cfg.source == "external":  # Left None for the scions, so that resolve(resolve(cfg)) == resolve(cfg).
            cfg.level = "layer" if cfg.level is None else cfg.level
            if cfg.level not in LEVELS:
                raise ConfigError(f"Unknown --level={cfg.level!r}; valid: {', '.join(LEVELS)}.")
            if cfg.criterion is not None and cfg.criterion not in CRITERIA:
                raise ConfigError(f"Unknown --criterion={cfg.criterion!r}; valid: {', '.join(CRITERIA)}.")
            cfg.criterion = cfg.criterion or ("entropy" if cfg.level == "layer" else "bn_scale")
            cfg.a = 0.4 if cfg.a is None else float(cfg.a)
            cfg.c = 500.0 if cfg.c is None else float(cfg.c)
            if not 0 <= cfg.a <= 1:
                raise ConfigError(f"--a must lie in [0, 1], got {cfg.a}.")
            if not (cfg.c >= 0 and math.isfinite(cfg.c)):
                raise ConfigError(f"--c must be a finite number >= 0, got {cfg.c}.")
        cfg.graft_every = 1 if cfg.graft_every is None else cfg.graft_every
        _positive_int(cfg.graft_every, "graft_every")

    # Number of models.
    peers_needed = (method in ("mutual", "ensemble") or (method in _GRAFT_METHODS and cfg.source == "external"))
    if method == "baseline":
        if cfg.num_models not in (None, 1):
            raise ConfigError(f"--method=baseline trains one model, got --num_models={cfg.num_models}; use "
                              "--method=ensemble for independent models or --method=graft for grafting.")
        cfg.num_models = 1
    elif peers_needed:
        if cfg.num_models is None:
            cfg.num_models = 2
        _positive_int(cfg.num_models, "num_models")
        if cfg.num_models < 2:
            what = {"graft": "grafting between networks (--source=external) needs peers",
                    "cultivate": "cultivation grafts between networks (--source=external) and needs peers",
                    "mutual": "mutual learning needs peers", "ensemble": "an ensemble needs models"}[method]
            raise ConfigError(f"--method={method} with --num_models={cfg.num_models}: {what}; use "
                              "--num_models=2 or more" + (" or --method=baseline" if method != "graft" else
                                                          ", --method=baseline, or --source=internal|noise") + ".")
    else:
        cfg.num_models = 1 if cfg.num_models is None else cfg.num_models
        _positive_int(cfg.num_models, "num_models")
    if cfg.lr_spread and cfg.num_models < 2:
        raise ConfigError("--lr_spread spreads the initial learning rates over several models; with one model it "
                          "does nothing. Drop it or use --num_models=2 or more.")
    if cfg.lr_spread is None:  # The reference's default (--difflr) wherever networks graft each other.
        cfg.lr_spread = method in _GRAFT_METHODS and cfg.source == "external" and cfg.num_models >= 2

    # Distillation.
    if method in _DISTILL_METHODS:
        cfg.temperature = 2.0 if cfg.temperature is None else float(cfg.temperature)
        cfg.distill_weight = 1.0 if cfg.distill_weight is None else float(cfg.distill_weight)
        if not cfg.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {cfg.temperature}.")
        if not cfg.distill_weight >= 0:
            raise ConfigError(f"--distill_weight must be >= 0, got {cfg.distill_weight}.")
    if method == "cultivate":
        if not cfg.teacher:
            raise ConfigError("--method=cultivate distils from a teacher: pass --teacher=path/to/teacher.keras (train "
                              "one with --method=baseline --save_model=path/to/teacher.keras).")
        if not cfg.teacher.endswith(".keras"):
            raise ConfigError(f"--teacher must be a Keras model file ending in .keras, got {cfg.teacher!r}.")
        if check_files and not os.path.isfile(cfg.teacher):
            raise ConfigError(f"Teacher file {cfg.teacher!r} not found. Train a teacher first with "
                              f"--method=baseline --save_model={cfg.teacher}.")

    # RePr.
    if method == "repr":
        cfg.repr_s1 = 20 if cfg.repr_s1 is None else cfg.repr_s1
        cfg.repr_s2 = 10 if cfg.repr_s2 is None else cfg.repr_s2
        cfg.repr_cycles = 3 if cfg.repr_cycles is None else cfg.repr_cycles
        cfg.repr_ratio = 0.3 if cfg.repr_ratio is None else float(cfg.repr_ratio)
        cfg.repr_unit = "epoch" if cfg.repr_unit is None else cfg.repr_unit
        for flag in ("repr_s1", "repr_s2", "repr_cycles"):
            _positive_int(getattr(cfg, flag), flag)
        if not 0 < cfg.repr_ratio < 1:
            raise ConfigError(f"--repr_ratio must lie in (0, 1), got {cfg.repr_ratio}.")
        if cfg.repr_unit not in REPR_UNITS:
            raise ConfigError(f"Unknown --repr_unit={cfg.repr_unit!r}; valid: {', '.join(REPR_UNITS)}.")

    if cfg.save_model is not None and not cfg.save_model.endswith(".keras"):
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
_NAMED_FIELDS = ("method", "model", "depth", "width", "dataset")
_MAX_NAME = 150


def run_settings(cfg):
    """{setting: value} of everything that changes what a run does (every field but :data:`LOCATION_FIELDS`)."""
    values = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    defaults = Config().to_dict()
    return {key: values.get(key, defaults[key]) for key in defaults if key not in LOCATION_FIELDS}


def _method_defaults(cfg):
    """The resolved config of ``cfg``'s method, network and dataset with every other setting at its default."""
    base = Config(method=cfg.method, model=cfg.model, depth=cfg.depth, width=cfg.width, dataset=cfg.dataset,
                  output=os.devnull, log_dir=os.devnull)
    if cfg.method in _GRAFT_METHODS:
        base.source = cfg.source
    if cfg.method == "cultivate":
        base.teacher = cfg.teacher
    return resolve(base, check_files=False)


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


def run_name(cfg):
    """The default folder name of a resolved config: ``<method>_<network>_<dataset>``, then every other setting
    that differs from the method's defaults (``graft_resnet20_w8_fashion_mnist_local-epochs=2-graft_every=3``); a
    hash of those settings instead when the name would be long. Two configs that run differently never share it."""
    base = f"{cfg.method}_{model_spec(cfg).label}_{cfg.dataset}"
    changed = [(key, value) for key, value in changed_settings(cfg) if key not in _NAMED_FIELDS]
    if not changed:
        return base
    tokens = [re.sub(r"[^\w.+=-]", "_", _setting_text(key, value)) for key, value in changed]
    name = "-".join([base] + tokens)
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha1(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{base}-{digest}"


def _config_from_dict(values):
    """A Config from a results JSON's ``config`` (fields it does not know are dropped, missing ones default)."""
    fields = Config.__dataclass_fields__
    return Config(**{key: value for key, value in values.items() if key in fields})


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
        theirs_text = describe(_config_from_dict(previous))
    except (ConfigError, TypeError, ValueError, KeyError):
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
    if cfg.source == "external":  # Between epochs, none after the final one (keras_graft.Grafting).
        timing = keras_graft.Grafting(every_n_epochs=cfg.graft_every)
        return sum(1 for epoch in range(cfg.epochs - 1) if timing.round_due(epoch))
    return sum(1 for epoch in range(cfg.epochs) if ScionCallback.round_due(epoch, cfg.graft_every))


def run_warnings(cfg, steps_per_epoch=None):
    """Messages about a resolved config that will run but not do what its method is for."""
    messages = []
    rounds = graft_rounds(cfg)
    if rounds == 0:
        if cfg.source == "external":
            messages.append(
                f"--graft_every={cfg.graft_every} with --epochs={cfg.epochs}: no graft will happen. A round runs "
                f"between two epochs, after epochs {cfg.graft_every}, {2 * cfg.graft_every}, ..., and none follows "
                f"the final epoch; use --epochs={cfg.graft_every + 1} or more, or a smaller --graft_every.")
        else:
            messages.append(
                f"--graft_every={cfg.graft_every} with --epochs={cfg.epochs}: no scion will be grafted (rounds "
                f"run after epochs {cfg.graft_every}, {2 * cfg.graft_every}, ...); use --epochs={cfg.graft_every} "
                "or more.")
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
    configs = [resolve(_config_from_dict(c) if not isinstance(c, Config) else c, check_files=False)
               for c in configs]
    settings = [run_settings(c) for c in configs]
    varying = {key for key in settings[0] if any(s[key] != settings[0][key] for s in settings)}
    labels = []
    for cfg in configs:
        tokens = [cfg.method]
        if varying & {"model", "depth", "width"}:
            tokens.append(model_spec(cfg).label)
        if "dataset" in varying:
            tokens.append(cfg.dataset)
        tokens += [_setting_text(key, value) for key, value in changed_settings(cfg)
                   if key in varying and key not in _NAMED_FIELDS]
        labels.append(" ".join(tokens))
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------

_RESNET = re.compile(r"^resnet(\d+)(_leaky)?$")
_WRN = re.compile(r"^wrn(\d+)_(\d+)$")


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a network (for the plots): stored in the results JSON as ``"model_spec"``."""

    name: str
    family: str
    depth: int = None
    width: int = None
    activation: str = "relu"
    num_classes: int = 10
    input_shape: tuple = (32, 32, 3)
    weight_decay: float = 0.0

    @property
    def label(self):
        """A readable name: resnet32, resnet8_w8, wrn16_4, mobilenetv2."""
        if self.family == "resnet":
            name = f"resnet{self.depth}" + ("_leaky" if self.activation == "leaky_relu" else "")
            return name + (f"_w{self.width}" if self.width != 16 else "")
        if self.family == "wrn":
            return f"wrn{self.depth}_{self.width}"
        return self.name

    def build(self):
        kwargs = dict(num_classes=self.num_classes, input_shape=tuple(self.input_shape),
                      weight_decay=self.weight_decay)
        if self.family == "resnet":
            return models.cifar_resnet(self.depth, activation=self.activation, width=self.width, **kwargs)
        if self.family == "wrn":
            return models.wide_resnet(self.depth, self.width, **kwargs)
        return models.get(self.name, **kwargs)

    def to_dict(self):
        return {**dataclasses.asdict(self), "input_shape": list(self.input_shape)}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def model_spec(cfg, dataset_info=None):
    """The ModelSpec of ``cfg.model`` with ``--depth``/``--width`` (pure Python; ConfigError on bad names)."""
    name, depth, width = cfg.model, cfg.depth, cfg.width
    if dataset_info is None:
        shape, classes = (32, 32, 3), 10
    else:
        shape, classes = dataset_info.input_shape, dataset_info.num_classes
    common = dict(num_classes=classes, input_shape=tuple(shape), weight_decay=cfg.weight_decay)
    match = _RESNET.match(name or "")
    if match:
        depth = int(match.group(1)) if depth is None else depth
        width = 16 if width is None else width
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"Unsupported CIFAR ResNet depth {depth}: the depth must be 6n + 2 (8, 14, 20, 26, 32, "
                              f"44, 56, 110, ...; the papers use 20, 32, 56 and 110).")
        _positive_int(width, "width")
        return ModelSpec(name, "resnet", depth, width, "leaky_relu" if match.group(2) else "relu", **common)
    match = _WRN.match(name or "")
    if match:
        depth = int(match.group(1)) if depth is None else depth
        width = int(match.group(2)) if width is None else width
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"Unsupported wide ResNet depth {depth}: the depth must be 6n + 4 (10, 16, 22, 28, ...; "
                              "the papers use 28).")
        _positive_int(width, "width")
        return ModelSpec(name, "wrn", depth, width, **common)
    if name in models.available():
        extra = _given(cfg, ("depth", "width"))
        if extra:
            raise ConfigError(f"{', '.join(extra)} apply to the ResNet family (resnet<depth>, wrn<depth>_<k>), not "
                              f"--model={name}.")
        return ModelSpec(name, name, **common)
    raise ConfigError(f"Unknown --model={name!r}; available: {', '.join(models.available())} (and resnet<6n+2> "
                      "or wrn<6n+4>_<k> for other depths and widths, or --depth/--width).")


# ---------------------------------------------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------------------------------------------


class ScionCallback(keras.callbacks.Callback):
    """Applies a scion (NoiseScion / InternalScion) to every model of a trainer every ``every`` epochs.

    What ``Grafting(peers=scion)`` does inside ``model.fit``, for GraftTrainer (whose Grafting only grafts its
    models in a ring). One scion per model, so each NoiseScion draws its own noise. Runs in the strategy's scope,
    outside ``strategy.run``, so every replica gets the same values. Adds ``scion_filters`` (filters grafted this
    round, all models) and ``scion_filters_<k>`` to the logs.
    """

    def __init__(self, scions, models_, strategy, every=1):
        super().__init__()
        self.scions = list(scions)
        self.models_ = list(models_)
        self.strategy = strategy
        self.every = every

    @staticmethod
    def round_due(epoch, every):
        """Whether a round follows (0-based) epoch ``epoch``: after epochs every, 2 * every, ..., the last included."""
        return (epoch + 1) % every == 0

    def on_epoch_end(self, epoch, logs=None):
        if not self.round_due(epoch, self.every):
            counts = [0] * len(self.models_)
        else:
            with self.strategy.scope():
                counts = [scion.apply(model, epoch).filters for scion, model in zip(self.scions, self.models_)]
        if logs is not None:
            logs["scion_filters"] = int(sum(counts))
            if len(counts) > 1:
                logs.update({f"scion_filters_{k}": int(n) for k, n in enumerate(counts)})


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


# ---------------------------------------------------------------------------------------------------------------
# One experiment
# ---------------------------------------------------------------------------------------------------------------


def is_chief(strategy):
    """True in the process that writes files (the only one unless the strategy spans several workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not strategies.is_multi_worker(strategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and task_type == "worker" and task_id == 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tf.Tensor):
        return value.numpy().tolist()
    return str(value)


def write_json(path, data):
    """Writes ``data`` to ``path`` atomically (a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _check_teacher(path, spec):
    try:
        teacher = keras.saving.load_model(path, compile=False)
    except Exception as e:  # noqa: BLE001 - any failure to load is a bad teacher file
        raise ConfigError(f"Cannot load the teacher {path!r}: {type(e).__name__}: {e}") from e
    in_shape = tuple(teacher.inputs[0].shape[1:]) if getattr(teacher, "inputs", None) else None
    out = teacher.outputs[0].shape[-1] if getattr(teacher, "outputs", None) else None
    if in_shape is not None and in_shape != tuple(spec.input_shape):
        raise ConfigError(f"The teacher {path!r} takes inputs of shape {in_shape}, the data gives "
                          f"{tuple(spec.input_shape)} (check --dataset and --image_size).")
    if out is not None and out != spec.num_classes:
        raise ConfigError(f"The teacher {path!r} outputs {out} classes, the dataset has {spec.num_classes}.")
    del teacher


def _data(cfg, dsinfo, strategy):
    """(train dataset function for GraftTrainer, steps per epoch, examples, test dataset, validation dataset).

    Reads the data now, so that missing data fails before training.
    """
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ConfigError(f"--batch_size={cfg.batch_size} is not divisible by the strategy's {replicas} replicas.")
    examples = min(cfg.train_subset or dsinfo.train_size, dsinfo.train_size)
    available = math.ceil(examples / cfg.batch_size) if replicas == 1 else examples // cfg.batch_size
    if available == 0:
        raise ConfigError(f"--train_subset={examples} is smaller than one batch of {cfg.batch_size} on "
                          f"{replicas} replicas.")
    steps = available
    if cfg.steps_per_epoch is not None:
        if cfg.steps_per_epoch > available:
            raise ConfigError(f"--steps_per_epoch={cfg.steps_per_epoch} but {examples} training examples in batches "
                              f"of {cfg.batch_size} give {available} steps per epoch.")
        steps = cfg.steps_per_epoch
    # Each (model, epoch) gets its own order and augmentation; a resumed epoch sees the same batches again.
    train_fn = datasets.per_model_dataset_fn(
        cfg.dataset, batch_size=cfg.batch_size, base_seed=int(cfg.seed) * 100_003, subset=cfg.train_subset,
        image_size=cfg.image_size, data_dir=cfg.data_dir, drop_remainder=replicas > 1)

    try:
        train_fn(0)  # Reads the training split into memory (shared by every model's pipeline).
        eval_batch = max(256, cfg.batch_size) // replicas * replicas
        test = datasets.load(cfg.dataset, dsinfo.test_split, batch_size=eval_batch, subset=cfg.test_subset,
                             image_size=cfg.image_size, data_dir=cfg.data_dir)
        validation = test
        if cfg.val_subset is not None and cfg.val_subset != cfg.test_subset:
            validation = datasets.load(cfg.dataset, dsinfo.test_split, batch_size=eval_batch, subset=cfg.val_subset,
                                       image_size=cfg.image_size, data_dir=cfg.data_dir)
    except datasets.DatasetUnavailableError as e:  # Reworded for the flags the scripts have.
        raise ConfigError(e.message_for(data_dir="--data_dir=DIR", download=None)) from e
    return train_fn, steps, examples, test, validation


def _schedule(cfg):
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "cosine":
        return "cosine"
    return {"name": "step", "every_epochs": cfg.lr_step_epochs, "factor": 0.1}


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
    return (f"{cfg.method}: {what}; {model_spec(cfg).label} on {cfg.dataset}, {epochs}, batch {cfg.batch_size}, "
            f"SGD lr {cfg.lr:g}{' spread' if cfg.lr_spread else ''} ({schedule[cfg.schedule]}), "
            f"weight decay {cfg.weight_decay:g}")


def run(cfg, log=logging.info, strategy=None, overwrite=False):
    """Trains the experiment ``cfg`` and returns its results (also written to ``cfg.output`` as JSON).

    Everything that can fail on bad input fails before the first training step, with a ConfigError; that
    includes an output folder that holds a run of another configuration (unless ``overwrite``). Settings that
    will run but not do what the method is for (no graft round at all) are logged as warnings.
    ``strategy``: an existing tf.distribute strategy instead of creating ``cfg.strategy``.
    """
    cfg = resolve(cfg)
    if strategy is None:
        strategy = strategies.get(cfg.strategy)  # First: MultiWorkerMirroredStrategy must exist before any op.
    chief = is_chief(strategy)
    if chief and not overwrite:
        check_output(cfg)
    dsinfo = datasets.info(cfg.dataset, image_size=cfg.image_size)
    spec = model_spec(cfg, dsinfo)
    if cfg.method == "cultivate":
        _check_teacher(cfg.teacher, spec)
    out_dir = os.path.dirname(os.path.abspath(cfg.output))
    log(describe(cfg))
    log(f"Output folder: {out_dir}")

    kwargs = {}
    if cfg.method in _GRAFT_METHODS and cfg.source == "external":
        kwargs["grafting"] = keras_graft.Grafting(criterion=cfg.criterion, a=cfg.a, c=cfg.c, level=cfg.level,
                                                  every_n_epochs=cfg.graft_every)
    if cfg.method in _DISTILL_METHODS:
        teachers = [cfg.teacher] if cfg.method == "cultivate" else []
        kwargs["distillation"] = keras_graft.Distillation(teachers, temperature=cfg.temperature,
                                                          weight=cfg.distill_weight, mutual=cfg.method == "mutual")
    try:
        trainer = GraftTrainer(
            spec.build, num_models=cfg.num_models,
            optimizer=keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
            strategy=strategy, lr_spread=cfg.lr_spread, lr_schedule=_schedule(cfg), seed=cfg.seed,
            backup_dir=cfg.backup_dir, data_order="shared" if cfg.method == "mutual" else "per_model", **kwargs)
    except ValueError as e:
        hint = (" Pass --image_size=32 to pad the images to CIFAR's size." if spec.input_shape[0] < 32 else "")
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        raise ConfigError(f"Cannot build {cfg.num_models} x --model={cfg.model} for {cfg.dataset} inputs of shape "
                          f"{tuple(spec.input_shape)}.{hint} The error: {message}") from e
    train_fn, steps, examples, test, validation = _data(cfg, dsinfo, strategy)
    for message in run_warnings(cfg, steps):
        logging.warning(message)
    filters_per_model = criteria.invalid_filters(trainer.models[0], THRESHOLDS[0]).total
    log(f"{spec.label}: {trainer.models[0].count_params():,} weights, {filters_per_model} filters per model; "
        f"{examples} training images, {steps} steps per epoch, {strategy.num_replicas_in_sync} replica(s).")

    callbacks = [keras_graft.FilterStats(thresholds=list(THRESHOLDS))]
    repr_cb = None
    if cfg.method == "repr":
        repr_cb = keras_graft.RePr(s1=cfg.repr_s1, s2=cfg.repr_s2, prune_ratio=cfg.repr_ratio, cycles=cfg.repr_cycles,
                                   unit=cfg.repr_unit, seed=cfg.seed)
        repr_cb.models, repr_cb.optimizers = trainer.models, trainer.optimizers
        callbacks.append(repr_cb)
    if cfg.method in _GRAFT_METHODS and cfg.source != "external":
        if cfg.source == "noise":
            scions = [keras_graft.NoiseScion(threshold=cfg.threshold, sigma_decay=cfg.sigma_decay,
                                             seed=cfg.seed * 1000 + k) for k in range(cfg.num_models)]
        else:
            scions = [keras_graft.InternalScion(threshold=cfg.threshold) for _ in range(cfg.num_models)]
        callbacks.append(ScionCallback(scions, trainer.models, strategy, cfg.graft_every))
    test_size = min(cfg.test_subset or dsinfo.test_size, dsinfo.test_size)
    val_size = min(cfg.val_subset or test_size, dsinfo.test_size)
    progress = EpochLogger(log, cfg.epochs, cfg.num_models, val_images=val_size if val_size < test_size else None)
    callbacks.append(progress)
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


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Filter plots
# ---------------------------------------------------------------------------------------------------------------


def load_results_near(weights_path):
    """The results JSON in the folder of a weights file, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), RESULTS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def filter_norms(model):
    """[(layer name, per-filter L1 norms as a NumPy array)] for every convolution layer of ``model``."""
    out = []
    for layer in layouts.filter_layers(model):
        kernel, axes = layouts.primary_kernel(layer)
        out.append((layer.name, criteria.l1_norm(kernel, per_filter=True, filter_axes=axes).numpy()))
    return out


def read_csv_log(path):
    """{column: [floats]} of a Keras CSVLogger file (non-numeric cells become NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def _accuracy_columns(columns):
    """[(column, is_ensemble)] to plot: test (val_) accuracies per model and ensemble, else training accuracy."""
    for prefix in ("val_accuracy", "accuracy"):
        per_model = sorted((c for c in columns if re.fullmatch(rf"{prefix}_\d+", c)),
                           key=lambda c: int(c.split("_")[-1]))
        picked = [(c, False) for c in per_model] or ([(prefix, False)] if prefix in columns else [])
        if picked:
            if f"{prefix}_ensemble" in columns and len(per_model) > 1:
                picked.append((f"{prefix}_ensemble", True))
            return prefix, picked
    return None, []


def plot_filters(entries, output, logs=(), threshold=0.1, title=None, summary=None, curves_note=None):
    """Writes a PNG comparing the filters of several trained models.

    Panels: (a) histogram of every convolution filter's L1 norm per model (log scale, invalid thresholds 0.1 and
    0.01 marked); (b) the same distributions as violins; (c) per layer, the median and the smallest filter L1 norm;
    (d) invalid filters (L1 norm < ``threshold``) per layer; (e) accuracy curves from training logs; (f) a summary.

    Args:
      entries: [(label, [(layer, L1 norms)])], e.g. from :func:`filter_norms`.
      output: PNG path.
      logs: [(label, CSV path)] of training logs (Keras CSVLogger, e.g. train.py's log.csv) for the curves.
      threshold: the L1 norm below which a filter counts as invalid, for the per-layer bars.
      title: figure title.
      summary: extra text lines for the summary panel (e.g. test accuracies).
      curves_note: a note written under the accuracy curves (e.g. why some of them coincide).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not entries:
        raise ValueError("plot_filters needs at least one model.")
    logs = [(label, path) for label, path in logs if path and os.path.isfile(path)]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    (ax_hist, ax_violin, ax_layers), (ax_invalid, ax_curves, ax_text) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = [colors[i % len(colors)] for i in range(len(entries))]
    flat = [np.concatenate([n for _, n in layers]) for _, layers in entries]
    everything = np.concatenate(flat)
    positive = everything[everything > 0]
    low = min(positive.min() if positive.size else 1e-3, min(THRESHOLDS)) / 2
    high = max(everything.max(), 1.0) * 1.5
    bins = np.geomspace(low, high, 60)

    def thresholds(ax, vertical):
        for t, style in zip(THRESHOLDS, ("--", ":")):
            line = ax.axvline if vertical else ax.axhline
            line(t, color="k", linestyle=style, linewidth=1, label=f"L1 = {t:g}")

    # (a) Histogram of all filters.
    for i, ((label, _), norms) in enumerate(zip(entries, flat)):
        ax_hist.hist(np.clip(norms, low, None), bins=bins, histtype="step", linewidth=1.6, color=color[i],
                     label=f"{label}: {int(np.sum(norms < THRESHOLDS[0]))} below {THRESHOLDS[0]:g}")
    thresholds(ax_hist, vertical=True)
    ax_hist.set_xscale("log")
    ax_hist.set_xlabel("filter L1 norm (log scale)")
    ax_hist.set_ylabel("filters")
    ax_hist.set_title("(a) L1 norms of all convolution filters")
    ax_hist.legend(fontsize=7)

    # (b) Violins per model.
    parts = ax_violin.violinplot([np.maximum(norms, low) for norms in flat], showmedians=True)
    for i, body in enumerate(parts["bodies"]):
        body.set_facecolor(color[i])
        body.set_alpha(0.5)
    ax_violin.set_yscale("log")
    thresholds(ax_violin, vertical=False)
    ax_violin.set_xticks(range(1, len(entries) + 1), [label for label, _ in entries], rotation=15)
    ax_violin.set_ylabel("filter L1 norm (log scale)")
    ax_violin.set_title("(b) Distribution per model")

    # (c) Per layer: median and smallest L1 norm.
    for i, (label, layers) in enumerate(entries):
        x = np.arange(len(layers))
        ax_layers.plot(x, [np.median(n) for _, n in layers], color=color[i], marker="o", markersize=3,
                       label=f"{label} median")
        ax_layers.plot(x, [max(n.min(), low) for _, n in layers], color=color[i], linestyle="--", marker="v",
                       markersize=3, label=f"{label} smallest")
    thresholds(ax_layers, vertical=False)
    ax_layers.set_yscale("log")
    ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layers.set_xlabel("convolution layer (input to output)")
    ax_layers.set_ylabel("filter L1 norm (log scale)")
    ax_layers.set_title("(c) Filter L1 norms per layer")
    ax_layers.legend(fontsize=7, ncol=2)

    # (d) Invalid filters per layer.
    width = 0.8 / len(entries)
    layers_max = max(len(layers) for _, layers in entries)
    any_invalid = False
    for i, (label, layers) in enumerate(entries):
        invalid = [int(np.sum(n < threshold)) for _, n in layers]
        any_invalid |= any(invalid)
        x = np.arange(len(layers)) + (i - (len(entries) - 1) / 2) * width
        ax_invalid.bar(x, invalid, width=width, color=color[i], label=f"{label} (total {sum(invalid)})")
    ax_invalid.set_xlim(-1, layers_max)
    ax_invalid.set_ylim(0, None if any_invalid else 1)
    if not any_invalid:
        ax_invalid.text(0.5, 0.5, f"no filter has an L1 norm below {threshold:g}", ha="center", va="center",
                        transform=ax_invalid.transAxes)
    ax_invalid.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_invalid.set_xlabel("convolution layer (input to output)")
    ax_invalid.set_ylabel("invalid filters")
    ax_invalid.set_title(f"(d) Invalid filters per layer (L1 < {threshold:g})")
    ax_invalid.legend(fontsize=7)

    # (e) Accuracy curves.
    ylabel = None
    for i, (label, path) in enumerate(logs):
        columns = read_csv_log(path)
        prefix, picked = _accuracy_columns(columns)
        if not picked:
            continue
        epochs = [e + 1 for e in columns.get("epoch", range(len(columns[picked[0][0]])))]
        for j, (column, ensemble) in enumerate(picked):
            which = "ensemble" if ensemble else (f"model {column.rsplit('_', 1)[-1]}" if column[-1].isdigit() else "")
            ax_curves.plot(epochs, [100 * v for v in columns[column]], color=colors[i % len(colors)],
                           linestyle="--" if ensemble else ("-", "-.", ":")[j % 3], marker="o", markersize=3,
                           label=f"{label} {which}".strip())
        ylabel = ("test" if prefix == "val_accuracy" else "training") + " accuracy (%)"
    if ylabel:
        ax_curves.set_ylabel(ylabel)
        ax_curves.set_xlabel("epoch")
        ax_curves.legend(fontsize=7)
    else:
        ax_curves.text(0.5, 0.5, "no training logs given", ha="center", va="center", transform=ax_curves.transAxes)
    ax_curves.set_title("(e) Accuracy during training")
    if curves_note and ylabel:
        ax_curves.text(0.02, 0.02, textwrap.fill(curves_note, 70), ha="left", va="bottom", fontsize=7,
                       transform=ax_curves.transAxes, bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))

    # (f) Summary.
    lines = []
    for (label, layers), norms in zip(entries, flat):
        counts = ", ".join(f"{int(np.sum(norms < t))} < {t:g}" for t in THRESHOLDS)
        lines.append(f"{label}: {norms.size} filters in {len(layers)} layers; invalid {counts}")
    lines += list(summary or [])
    ax_text.axis("off")
    ax_text.set_title("(f) Summary")
    ax_text.text(0.0, 1.0, "\n".join(lines), ha="left", va="top", family="monospace", fontsize=8,
                 transform=ax_text.transAxes, wrap=True)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def load_trained(weights_path, spec):
    """A model built from ``spec`` with the weights of ``weights_path``."""
    model = spec.build()
    try:
        model.load_weights(weights_path)
    except Exception as e:  # noqa: BLE001 - report which file and which architecture did not match
        raise ConfigError(f"Cannot load {weights_path!r} into {spec.label} (input {tuple(spec.input_shape)}, "
                          f"{spec.num_classes} classes): {type(e).__name__}: {e}") from e
    return model
