"""Shared test helpers."""

import functools

import tensorflow as tf


@functools.lru_cache(maxsize=None)
def mirrored_strategy():
    """One MirroredStrategy over the two logical CPUs for the whole test session.

    Several MirroredStrategy objects in one process draw colliding collective instance keys, so every test that
    needs one shares this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
