"""GraftConfig: the settings of a graft round and of its timing, validated once.

``Grafting`` (``model.fit``), ``PeerEnsemble`` and ``GraftTrainer`` read their graft settings from one
GraftConfig: alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)) with I the criterion, at layer or filter
level, after epochs n, 2n, ... (n = ``every_n_epochs``).
"""

import keras

from keras_graft import checks
from keras_graft import criteria as criteria_lib
from keras_graft import grafting


@keras.saving.register_keras_serializable(package="keras_graft")
class GraftConfig:
    """The graft settings.

    Args:
      criterion: "entropy", "l1", "bn_scale", a criterion object; None: entropy (layer), BN scale (filter).
      a, c: alpha = 0.5 + (a / pi) * arctan(c * (I_self - I_peer)); a in [0, 1], c >= 0.
      level: "layer" or "filter".
      every_n_epochs: graft after epochs n, 2n, ... (1-based).
      layers: only graft these layer names (or the layers where this callable is true).
      final_graft: also graft after the final epoch (the weights returned are then grafted, not validated).
      owner: the name error messages begin with (``Grafting`` passes its own).
    """

    def __init__(self, criterion=None, a=0.4, c=500.0, level="layer", every_n_epochs=1, layers=None,
                 final_graft=False, *, owner="GraftConfig"):
        grafting.validate_hyperparameters(a, c, level, owner)
        self.every_n_epochs = checks.integer(owner, "every_n_epochs", every_n_epochs, minimum=1)
        self.layers = checks.layer_selection(owner, layers)
        self.final_graft = checks.boolean(owner, "final_graft", final_graft)
        self.criterion = criteria_lib.get(criterion or grafting.default_criterion(level))
        self.a = float(a)
        self.c = float(c)
        self.level = level

    def round_due(self, epoch):
        """Whether a round follows (0-based) epoch ``epoch``: after epochs n, 2n, ..."""
        return (epoch + 1) % self.every_n_epochs == 0

    def grafter(self, model):
        """A :class:`keras_graft.Grafter` of ``model`` with these settings."""
        return grafting.Grafter(model, self.criterion, self.a, self.c, self.level, self.layers)

    def ring(self, models):
        """A :class:`keras_graft.RingGrafter` of ``models`` with these settings."""
        return grafting.RingGrafter(models, self.criterion, self.a, self.c, self.level, self.layers)

    def get_config(self):
        """The settings as JSON-able values; a callable ``layers`` is not serialisable and becomes None."""
        return {
            "criterion": criteria_lib.serialize(self.criterion),
            "a": self.a,
            "c": self.c,
            "level": self.level,
            "every_n_epochs": self.every_n_epochs,
            "layers": None if callable(self.layers) else self.layers,
            "final_graft": self.final_graft,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"GraftConfig({args})"


def get(settings, owner="GraftTrainer"):
    """A GraftConfig from a GraftConfig or a dict of its arguments."""
    if isinstance(settings, GraftConfig):
        return settings
    if isinstance(settings, dict):
        return GraftConfig(**settings, owner=owner)
    raise TypeError(f"{owner}: grafting settings must be a keras_graft.GraftConfig or a dict of its arguments, "
                    f"got {checks.shown(settings)}.")
