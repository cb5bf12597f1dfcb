"""keras_graft: filter grafting, cultivation and RePr for Keras 3 on TensorFlow.

The package root imports only the core; ``keras_graft.models`` and ``keras_graft.datasets`` are imported on
their own, so the core never depends on them.
"""

from keras_graft import criteria, layouts, schedules, strategies
from keras_graft.callbacks import FilterStats, Grafting
from keras_graft.config import GraftConfig
from keras_graft.distillation import Distillation
from keras_graft.grafting import Grafter, GraftResult, RingGrafter, adaptive_coefficient, graft
from keras_graft.peers import ModelPeers, PeerSource
from keras_graft.reactivation import RePr
from keras_graft.scions import InternalScion, NoiseScion
from keras_graft.shared_directory import InvalidWeightsError, RankConflictError, SharedDirectory, UnreadableWeightsError
from keras_graft.ensemble import PeerEnsemble
from keras_graft.trainer import GraftTrainer

__version__ = "0.1.0"
