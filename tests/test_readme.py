"""Every Python snippet of README.md runs, in order, on tiny data.

The snippets are written for CIFAR-10 and 200 epochs; here the networks the library builds are ResNet-8 of width 2
on 8x8 images, ``epochs=`` and ``batch_size=`` become 2 and 8, paths go to a temporary directory, "mirrored" is
one replica on /cpu:0 (what it is on a machine with one CPU device; test_trainer.py runs two replicas), and the
files the snippets load (a donor, a teacher) and the peer's file of the SharedDirectory round are written first.
Nothing else of a snippet changes.
"""
import os
import re
from unittest import mock

import numpy as np
import tensorflow as tf

import keras_graft
from keras_graft import models, strategies

import testing_utils  # noqa: F401  (splits the CPU, as every test file does)

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SHAPE = (8, 8, 3)


def snippets():
    with open(README) as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.DOTALL)


def tiny_resnet(*args, build=models.cifar_resnet, **kwargs):
    """What ``models.get(name, ...)`` and ``models.cifar_resnet(depth, ...)`` build here: ResNet-8, width 2."""
    return build(8, width=2, input_shape=SHAPE, **kwargs)


class ReadmeTest(tf.test.TestCase):

    def test_snippets_use_logits_losses_and_keyword_metrics(self):
        blocks = snippets()
        self.assertIn("keras_graft.PeerEnsemble(", blocks[0])  # the shortest path from model.fit to grafting
        for block in blocks:
            for loss in re.findall(r"Crossentropy\([^)]*\)", block):
                self.assertIn("from_logits=True", loss)
            self.assertNotRegex(block, r"compile\((?![^)]*metrics=)[^)]*\[\"accuracy\"\]")

    def test_snippets_run_in_order(self):
        tmp = self.get_temp_dir()
        rng = np.random.default_rng(0)
        namespace = {
            "x": rng.normal(size=(32, *SHAPE)).astype("float32"), "y": rng.integers(0, 10, size=32),
            "xv": rng.normal(size=(16, *SHAPE)).astype("float32"), "yv": rng.integers(0, 10, size=16),
            "RANK": 0,
        }
        shared = os.path.join(tmp, "shared")
        replacements = [(r"epochs=\d+", "epochs=2"), (r"batch_size=\d+", "batch_size=8"), ("/tmp/", tmp + "/"),
                        ("/mnt/shared/run1", shared)]
        real_get = strategies.get
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            with mock.patch.object(models, "get", tiny_resnet), \
                    mock.patch.object(models, "cifar_resnet", tiny_resnet), \
                    mock.patch.object(strategies, "get", lambda s=None: tf.distribute.MirroredStrategy(["/cpu:0"])
                                      if s == "mirrored" else real_get(s)):
                tiny_resnet().save("donor.keras")
                tiny_resnet().save("teacher.keras")
                # Rank 1 of the SharedDirectory snippet: its weights for the round after epoch 1.
                keras_graft.SharedDirectory(shared, rank=1, world_size=2).publish(tiny_resnet(), 0)
                for index, block in enumerate(snippets()):
                    for pattern, replacement in replacements:
                        block = re.sub(pattern, replacement, block)
                    with self.subTest(snippet=index):
                        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        finally:
            os.chdir(cwd)
        self.assertEqual(namespace["probabilities"].shape, (16, 10))  # PeerEnsemble.predict
        self.assertAllClose(namespace["probabilities"].sum(axis=1), np.ones(16), atol=1e-5)
        self.assertGreater(namespace["history"].history["graft_layers"][1], 0)  # the last fit (GraftTrainer) grafted
        rounds = sorted(name for name in os.listdir(shared) if name.startswith("round-"))
        self.assertEqual(rounds, ["round-000000-rank-0.weights.npz", "round-000000-rank-1.weights.npz"])


if __name__ == "__main__":
    tf.test.main()
