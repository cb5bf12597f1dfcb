"""keras_graft: filter grafting, cultivation and RePr for Keras 3 on TensorFlow."""

from keras_graft import criteria
from keras_graft.callbacks import FilterStats, Grafting
from keras_graft.grafting import Grafter, GraftResult, RingGrafter, adaptive_coefficient, graft
from keras_graft.peers import ModelPeers, PeerSource

__version__ = "0.1.0"
