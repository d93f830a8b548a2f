"""The whole private-prediction flow in one command (``bash run.sh demo``).

Three processes play the three roles of the tutorial:
this one trains the model and owns the workers, a serving process shares the
model and answers requests, and this process then acts as the client.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_demo(images: int = 10, epochs: int = 3) -> int:
    """Train, start workers, serve from a child process, query privately here."""
    from . import TFECluster, TFEWorker, load_mnist
    from .client import predict_each
    from .models import as_model_input, plaintext_logits, train_seed_cnn

    started = time.monotonic()
    (x_train, y_train), (x_test, y_test) = load_mnist()
    print(f"1/4 Training the CNN on {len(x_train):,} MNIST images ({epochs} epochs)")
    model = train_seed_cnn(as_model_input(x_train), y_train, epochs=epochs)
    _, accuracy = model.evaluate(as_model_input(x_test), y_test, verbose=0)
    print(f"    plaintext test accuracy: {accuracy:.4f}")

    x = as_model_input(x_test[:images])
    labels = y_test[:images]
    with tempfile.TemporaryDirectory(prefix="tfe-demo-") as tmp:
        weights = Path(tmp) / "weights.h5"
        config = Path(tmp) / "cluster.json"
        model.save_weights(weights)
        plain = plaintext_logits(weights, x)  # before connecting: see its docstring

        print("2/4 Starting three workers")
        workers = [TFEWorker(name=n) for n in ("alice", "bob", "carol")]
        with TFECluster(*workers) as cluster:
            cluster.save(config)
            print("3/4 Serving process: sharing the model and serving")
            server = subprocess.Popen(
                [sys.executable, "-m", "helpers", "serve", "--config", str(config),
                 "--weights", str(weights), "--requests", str(images)],
                cwd=Path(__file__).resolve().parent.parent)
            try:
                print("4/4 Client: querying privately", flush=True)
                agree = correct = 0
                worst = 0.0
                for answer in predict_each(x, cluster, timeout=300):
                    i, predicted = answer.index, int(answer.logits.argmax())
                    agree += predicted == int(plain[i].argmax())
                    correct += predicted == int(labels[i])
                    worst = max(worst, float(np.abs(answer.logits - plain[i]).max()))
                    verdict = "correct" if predicted == labels[i] else "wrong"
                    print(f"    image {i}: true {labels[i]}, private prediction {predicted} "
                          f"({verdict})", flush=True)
                server.wait(timeout=120)
            finally:
                if server.poll() is None:
                    server.terminate()
                    server.wait(timeout=30)
    print(f"Private predictions correct: {correct}/{images}; agree with plaintext: "
          f"{agree}/{images}; largest logit difference {worst:.1e}")
    print(f"Done in {time.monotonic() - started:.0f} s. The workers are stopped.")
    return 0 if agree == images and server.returncode == 0 else 1
