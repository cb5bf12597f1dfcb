"""The accuracy study's smoke run and report, end to end on the real Fashion-MNIST files."""

import json
import os
import tempfile
import unittest

import numpy as np
import tensorflow as tf

import processes

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STUDY = os.path.join(_ROOT, "benchmarks", "accuracy.py")
_DATA = os.path.isdir("/usr/share/datasets/fashion-mnist")


def _study(*args):
    return processes.run(_STUDY, ["--smoke", *args], cwd=_ROOT, timeout=600)


@unittest.skipUnless(_DATA, "the Fashion-MNIST IDX files (dataset-fashion-mnist) are not installed")
class AccuracyStudySmokeTest(tf.test.TestCase):

    def test_smoke_study_and_report(self):
        tmp = tempfile.mkdtemp(prefix="keras_graft_study_")
        paths = {name: os.path.join(tmp, name) for name in ("runs.jsonl", "summary.json", "table.md", "plot.png")}
        flags = [f"--output={paths['runs.jsonl']}", f"--summary={paths['summary.json']}",
                 f"--report_md={paths['table.md']}", f"--report_png={paths['plot.png']}",
                 f"--teacher_dir={tmp}/teachers", "--methods=baseline,graft2"]
        result = _study(*flags)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(paths["runs.jsonl"]) as f:
            records = {r["method"]: r for r in map(json.loads, f)}
        self.assertCountEqual(records, ["baseline", "graft2"])
        graft = records["graft2"]
        self.assertLen(graft["per_epoch"], 2)
        # The round after epoch 1 opened epoch 2; no round followed the last epoch.
        self.assertEqual(graft["per_epoch"][0]["graft_alpha"], [1.0, 1.0])
        self.assertNotEqual(graft["per_epoch"][1]["graft_alpha"], [1.0, 1.0])
        self.assertAllClose(sum(graft["per_epoch"][1]["graft_alpha"]), 1.0, atol=1e-6)
        self.assertEqual(graft["final_accuracy"], graft["per_epoch"][-1]["test_accuracy"])
        for k in range(2):
            self.assertEqual(graft["best_accuracy"][k], max(r["test_accuracy"][k] for r in graft["per_epoch"]))

        # A rerun finds both runs done and trains nothing: the file is unchanged (a new run has new timings).
        with open(paths["runs.jsonl"]) as f:
            lines = f.read()
        result = _study(*flags)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("[1/2] baseline seed 0: done already", result.stderr)
        self.assertIn("[2/2] graft2 seed 0: done already", result.stderr)
        self.assertNotIn("epoch 1:", result.stderr)
        with open(paths["runs.jsonl"]) as f:
            self.assertEqual(f.read(), lines)

        result = _study(*flags, "--report")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(paths["summary.json"]) as f:
            summary = json.load(f)
        (study,) = summary["studies"]
        for key in ("dataset", "train_examples", "model", "epochs", "batch_size", "steps_per_model"):
            self.assertIn(key, study["config"])
        self.assertEqual((study["config"]["train_examples"], study["config"]["test_examples"]), (512, 1000))
        methods = study["methods"]
        final = np.mean(graft["final_accuracy"]) - np.mean(records["baseline"]["final_accuracy"])
        self.assertAllClose(methods["graft2"]["paired_final_mean"], final)
        for key in ("models", "seeds", "final_mean", "final_std", "best_mean", "best_std", "paired_final_mean",
                    "paired_final_std", "invalid_ratio_final"):
            self.assertIn(key, methods["graft2"])
        self.assertTrue(os.path.getsize(paths["plot.png"]) > 10_000)


if __name__ == "__main__":
    tf.test.main()
