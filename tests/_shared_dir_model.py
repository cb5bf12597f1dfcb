"""The tiny model and data of the SharedDirectory tests, shared by the test and its worker processes."""

import keras
import numpy as np

NUM_CLASSES = 3
EXAMPLES = 64
BATCH_SIZE = 16


def build_model(rank):
    """A tiny conv net (conv + BN, strided conv, dense) with rank-dependent, seeded initial weights."""

    def init(k):
        return keras.initializers.GlorotUniform(seed=100 * rank + k)

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, kernel_initializer=init(0))(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", kernel_initializer=init(1))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, kernel_initializer=init(2))(x)
    model = keras.Model(inputs, outputs, name=f"tiny_{rank}")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def training_data(rank):
    """(x, y) of one rank: fixed random images and labels, different for every rank."""
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(EXAMPLES, 8, 8, 1)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=EXAMPLES).astype("int32")
    return x, y


# model.fit arguments of the workers and of the in-process repetition: no shuffling, so training is repeatable.
FIT_KWARGS = dict(batch_size=BATCH_SIZE, shuffle=False, verbose=0)
