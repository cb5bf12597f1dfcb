"""GraftTrainer under MultiWorkerMirroredStrategy: 2 worker processes on loopback ports (TF_CONFIG)."""
import json
import os
import socket

import numpy as np
import tensorflow as tf

import processes

WORKER = os.path.join(os.path.dirname(__file__), "_trainer_worker.py")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class MultiWorkerTest(tf.test.TestCase):

    def test_two_workers_end_with_identical_weights(self):
        tmp = self.get_temp_dir()
        cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
        backup = os.path.join(tmp, "backup")
        scratch = os.path.join(tmp, "scratch")  # The workers' temporary directory.
        os.makedirs(scratch)
        workers, outputs = [], []
        for index in range(2):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CONFIG=json.dumps(task), TMPDIR=scratch)
            outputs.append(os.path.join(tmp, f"worker{index}.npz"))
            workers.append(processes.PythonProcess(
                WORKER, ["--strategy=multi_worker", "--epochs=2", f"--out={outputs[-1]}", f"--backup_dir={backup}"],
                env=env))
        try:
            for worker in workers:
                self.assertEqual(worker.wait(timeout=300), 0, worker.output()[1][-3000:])
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        first, second = (np.load(path) for path in outputs)
        self.assertAllEqual(first["epochs_run"], [0, 1])
        self.assertAllEqual(first["iterations"], [12, 12])  # 48 examples, global batch 8, 2 epochs.
        for key in first.files:
            self.assertAllEqual(first[key], second[key], msg=key)
        # final_graft: the round after the final epoch 2 ran; with N = 2 both models are equal.
        for key in first.files:
            if key.startswith("m0_"):
                self.assertAllClose(first[key], first[key.replace("m0_", "m1_")], atol=1e-6)
        # The chief wrote the backup; the other worker deleted its temporary copy.
        self.assertIsNotNone(tf.train.latest_checkpoint(backup))
        self.assertEmpty([name for name in os.listdir(scratch) if name.startswith("graft_worker_backup_")])


if __name__ == "__main__":
    tf.test.main()
