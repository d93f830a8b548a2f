"""Benchmark: private prediction against plaintext Keras, in one run.

    bash run.sh bench            # full run (about 20 minutes on 2 cores)
    bash run.sh bench --quick    # smoke run: fewer queries, 1,000 images for agreement

Measures, on this machine, with three workers, a serving process and this
process as the client, all on loopback, for the helpers' serving with
SecureNN and with ABY3 side by side:
  * cluster start (from start() until all three workers answer);
  * model sharing time (reported by the serving process);
  * time from start() to the first answered private query, both as in the
    notebooks (one process starts the workers, shares and serves; a client
    process is already waiting) and with the serving process launched after
    start();
  * latency per query at batch 1 (median and p95);
  * throughput in images/s at batch sizes 1, 10 and 100, private and plaintext;
  * agreement of private and plaintext argmax over the MNIST test set, and
    the largest logit difference.
With the same weights and batch sizes, on three fresh workers, it also
measures TF Encrypted's stock serving queues (scripts/stock_serving.py), the
path the helpers replace, so the comparison is made on one machine in one run.
Last, a floor: the same private computation with all three parties in one
process, no network and no serving (scripts/protocol_floor.py). No serving
design can beat it on this machine.
Prints a markdown table and writes it, with a plot, to bench-results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

import helpers
from helpers.models import as_model_input, seed_cnn, train_seed_cnn

BATCHES = (1, 10, 100)
PROTOCOLS = ("securenn", "aby3")


def plaintext_figures(weights: Path, x: np.ndarray, queries: int) -> dict:
    """Latency and throughput of plain Keras, one fixed-batch model per size."""
    figures = {}
    for batch in BATCHES:
        model = seed_cnn(batch_size=batch)
        model.load_weights(weights)
        sample = x[:batch]
        model(sample)  # trace once
        n = max(5, queries // batch)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(sample).numpy()
            times.append(time.perf_counter() - start)
        figures[batch] = {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)),
                          "images_per_s": batch / float(np.median(times))}
    return figures


def plaintext_logits(weights: Path, x: np.ndarray) -> np.ndarray:
    model = seed_cnn(batch_size=100)
    model.load_weights(weights)
    return np.concatenate([model(x[i:i + 100]).numpy() for i in range(0, len(x), 100)])


def serve(config: Path, weights: Path, batch: int, requests: int, protocol: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--config", str(config), "--weights",
         str(weights), "--batch", str(batch), "--requests", str(requests), "--timeout", "1800",
         "--name", f"bench-{protocol}-{batch}", "--protocol", protocol, "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def private_figures(protocol: str, cluster, config: Path, weights: Path, x_all: np.ndarray,
                    queries: int, agreement_images: int, t0: float) -> dict:
    """Latency, throughput and agreement logits of the helpers' serving with one protocol."""
    result: dict = {"batches": {}, "sharing_s": []}
    servers = []
    try:
        for batch in BATCHES:
            n = max(5, queries // batch)
            extra = agreement_images // batch if batch == max(BATCHES) else 0
            server = serve(config, weights, batch, n + 1 + extra, protocol)
            servers.append(server)
            client = helpers.TFEWorker()
            client.connect_to_model((batch, 28, 28, 1), (batch, 10), cluster,
                                    timeout=600, model_name=f"bench-{protocol}-{batch}")
            started = time.perf_counter()
            client.query_model(x_all[:batch], timeout=600)  # first query
            if "first_query_s" not in result:
                result["first_query_s"] = time.perf_counter() - t0
                result["first_latency_s"] = time.perf_counter() - started
            times = []
            for i in range(n):
                sample = x_all[(i * batch) % 9000:(i * batch) % 9000 + batch]
                start = time.perf_counter()
                client.query_model(sample, timeout=600)
                times.append(time.perf_counter() - start)
            figures = {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)),
                       "images_per_s": batch / float(np.median(times))}
            result["batches"][batch] = figures
            print(f"{protocol} batch {batch:>3}: median {figures['median'] * 1000:.0f} ms, "
                  f"{figures['images_per_s']:.0f} images/s", flush=True)
            if extra:
                print(f"{protocol}: agreement over {agreement_images} test images ...", flush=True)
                result["logits"] = np.concatenate([
                    client.query_model(x_all[i:i + batch], timeout=600)
                    for i in range(0, agreement_images, batch)])
            server.wait(timeout=600)
            result["sharing_s"] += [float(word.split("=")[1]) for word in server.stdout.read().split()
                                    if word.startswith("shared_s=")]
    finally:
        for server in servers:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=30)
    return result


def first_answer_figures(weights: Path, x: np.ndarray, protocol: str) -> dict:
    """start() to the first answer as a reader meets it: notebook 02, then 03.

    A model-owner process (scripts/first_answer.py) with TensorFlow and the
    model loaded starts the workers, shares and serves; this process, already
    running, waits for the cluster file and queries one image.
    """
    with tempfile.TemporaryDirectory(prefix="tfe-first-") as tmp:
        folder = Path(tmp)
        owner = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "first_answer.py"),
                                  str(folder), str(weights), protocol], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        try:
            cluster = helpers.TFECluster.load(folder / "cluster.json", timeout=300, verbose=False)
            client = helpers.TFEWorker()
            client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=300)
            client.query_model(x[:1], timeout=300)
            answered = time.time()
            out, _ = owner.communicate(timeout=120)
        finally:
            if owner.poll() is None:
                owner.terminate()
                owner.wait(timeout=30)
        if owner.returncode != 0:
            raise RuntimeError(f"the model owner failed (status {owner.returncode}): {out}")
        began = float((folder / "start_time").read_text())
    words = dict(word.split("=") for word in out.split() if "=" in word)
    figures = {"start_to_answer_s": answered - began,
               "cluster_start_s": float(words["cluster_start_s"]),
               "sharing_s": float(words["shared_s"])}
    print(f"{protocol}: start() to first answer {figures['start_to_answer_s']:.1f} s "
          f"(cluster {figures['cluster_start_s']:.1f} s, sharing {figures['sharing_s']:.1f} s)",
          flush=True)
    return figures


STOCK_READY_WITHIN = 600.0


def _wait_for_line(proc: subprocess.Popen, expected: str, timeout: float) -> None:
    """Read ``proc``'s output until a line equals ``expected``; bounded by ``timeout`` s."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    pending = b""
    while time.monotonic() < deadline:
        # Raw reads: a buffered readline() could hold the line select() waits for.
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"the stock server exited (status {proc.wait()}) before '{expected}'")
        pending += chunk
        if expected.encode() in (line.strip() for line in pending.split(b"\n")):
            return
    raise RuntimeError(f"the stock server did not print '{expected}' within {timeout:.0f} s")


def stock_figures(config: Path, weights: Path, queries: int) -> dict:
    """Latency and throughput of TF Encrypted's stock QueueServer/QueueClient."""
    script = str(ROOT / "scripts" / "stock_serving.py")
    figures = {}
    for batch in BATCHES:
        n = max(5, queries // batch)
        server = subprocess.Popen([sys.executable, script, "server", str(config), str(weights),
                                   str(batch), str(n + 1)], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True)
        try:
            # Connect the client only once the model is shared: a client that
            # connects while the stock server is still sharing can hang both.
            _wait_for_line(server, "ready", STOCK_READY_WITHIN)
            client = subprocess.run([sys.executable, script, "client", str(config), str(batch),
                                     str(n + 1)], cwd=ROOT, capture_output=True, text=True,
                                    timeout=1800)
            if client.returncode != 0:
                raise RuntimeError(f"stock client failed:\n{client.stderr[-2000:]}")
            row = json.loads(client.stdout.strip().splitlines()[-1])
            server.wait(timeout=300)
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=30)
        times = row["times_s"]
        figures[batch] = {"median": float(np.median(times)), "p95": float(np.percentile(times, 95)),
                          "images_per_s": batch / float(np.median(times)),
                          "first_s": row["first_s"]}
        print(f"stock batch {batch:>3}: median {figures[batch]['median'] * 1000:.0f} ms, "
              f"{figures[batch]['images_per_s']:.0f} images/s", flush=True)
    return figures


def floor_figures(weights: Path, protocol: str) -> dict:
    """The private computation alone, in one process (scripts/protocol_floor.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "protocol_floor.py"), protocol,
                           ",".join(map(str, BATCHES)), "--weights", str(weights)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"protocol_floor.py {protocol} failed:\n{proc.stderr[-2000:]}")
    figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            figures[row["batch"]] = {"median": row["median_s"], "images_per_s": row["images_per_s"]}
    print(f"{protocol} alone, one process: batch 1 {figures[1]['median'] * 1000:.0f} ms, "
          f"batch {max(BATCHES)} {figures[max(BATCHES)]['images_per_s']:.0f} images/s", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    args = parser.parse_args()
    latency_queries = 30 if args.quick else 200
    agreement_images = 1000 if args.quick else 10000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = helpers.load_mnist()
    x_all = as_model_input(x_test)
    print("Training the seed CNN (3 epochs) ...", flush=True)
    model = train_seed_cnn(as_model_input(x_train), y_train, epochs=3, verbose=False)
    accuracy = float(np.mean(model.predict(x_all, verbose=0).argmax(1) == y_test))

    with tempfile.TemporaryDirectory(prefix="tfe-bench-") as tmp:
        weights, config = Path(tmp) / "w.h5", Path(tmp) / "cluster.json"
        model.save_weights(weights)
        # Everything plaintext happens before this process connects to the workers.
        plain = plaintext_figures(weights, x_all, latency_queries)
        plain_logits = plaintext_logits(weights, x_all[:agreement_images])

        floor = {protocol: floor_figures(weights, protocol) for protocol in PROTOCOLS}
        first = {protocol: first_answer_figures(weights, x_all, protocol) for protocol in PROTOCOLS}
        workers = [helpers.TFEWorker(name=n) for n in ("alice", "bob", "carol")]
        cluster = helpers.TFECluster(*workers, verbose=False)
        t0 = time.perf_counter()
        with cluster:
            cluster_start = time.perf_counter() - t0
            cluster.save(config)
            private = {protocol: private_figures(protocol, cluster, config, weights, x_all,
                                                 latency_queries, agreement_images, t0)
                       for protocol in PROTOCOLS}
        # Stock gets three fresh workers of its own, so it does not inherit
        # the memory that the helpers' runs left on these (and once, after
        # them, its sharing stalled for minutes on the used workers).
        print("TF Encrypted's stock serving queues, fresh workers ...", flush=True)
        workers = [helpers.TFEWorker(name=n) for n in ("alice", "bob", "carol")]
        with helpers.TFECluster(*workers, verbose=False) as stock_cluster:
            stock_cluster.save(config)
            stock = stock_figures(config, weights, latency_queries)

    sn, a3 = private["securenn"], private["aby3"]
    snb, a3b = sn["batches"], a3["batches"]

    def best(batch: int, key: str, pick=min) -> float:
        return pick(snb[batch][key], a3b[batch][key])

    def ms(seconds: float, digits: int = 0) -> str:
        return f"{seconds * 1000:.{digits}f} ms"

    rows = [
        ("cluster start: start() until 3 workers answer", f"{cluster_start:.1f} s", "", "", "", "",
         ""),
        ("model sharing (incl. tracing), per served model",
         *(f"{min(r['sharing_s']):.1f} to {max(r['sharing_s']):.1f} s" for r in (sn, a3)),
         "", "", "", ""),
        ("start() to first answered private query, as in notebooks 02 and 03",
         *(f"{first[p]['start_to_answer_s']:.1f} s" for p in PROTOCOLS), "", "", "", ""),
        ("start() to first answer, serving process launched after start()",
         f"{sn['first_query_s']:.1f} s", "", "", "", "", ""),
        ("first query once the model is shared, batch 1", f"{sn['first_latency_s']:.2f} s",
         f"{a3['first_latency_s']:.2f} s", "", "", f"{stock[1]['first_s']:.2f} s",
         f"{stock[1]['first_s'] / min(sn['first_latency_s'], a3['first_latency_s']):.1f}x"),
    ]
    for key, label in (("median", "median"), ("p95", "p95")):
        rows.append((f"latency at batch 1, {label}", ms(snb[1][key]), ms(a3b[1][key]),
                     ms(plain[1][key], 2), f"{best(1, key) / plain[1][key]:.0f}x",
                     ms(stock[1][key]), f"{stock[1][key] / best(1, key):.2f}x"))
    for batch in BATCHES:
        top = best(batch, "images_per_s", max)
        rows.append((f"throughput at batch {batch}", f"{snb[batch]['images_per_s']:.0f} img/s",
                     f"{a3b[batch]['images_per_s']:.0f} img/s",
                     f"{plain[batch]['images_per_s']:.0f} img/s",
                     f"{plain[batch]['images_per_s'] / top:.0f}x slower",
                     f"{stock[batch]['images_per_s']:.0f} img/s",
                     f"{top / stock[batch]['images_per_s']:.2f}x"))
    top = max(BATCHES)
    rows.append(("floor: the computation alone, one process, no network: batch 1 median",
                 *(ms(floor[p][1]["median"]) for p in PROTOCOLS), "", "", "", ""))
    rows.append((f"floor: throughput at batch {top}, one process, no network",
                 *(f"{floor[p][top]['images_per_s']:.0f} img/s" for p in PROTOCOLS),
                 "", "", "", ""))
    agree = {p: int(np.sum(r["logits"].argmax(1) == plain_logits.argmax(1)))
             for p, r in private.items()}
    worst = {p: float(np.abs(r["logits"] - plain_logits).max()) for p, r in private.items()}
    rows.append((f"argmax agreement, {agreement_images:,} test images",
                 *(f"{agree[p]:,}/{agreement_images:,}" for p in PROTOCOLS), "", "", "", ""))
    rows.append(("largest logit difference", *(f"{worst[p]:.1e}" for p in PROTOCOLS),
                 "", "", "", ""))
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    table = [f"Machine: {machine}; plaintext test accuracy {accuracy:.4f}; "
             f"{time.strftime('%Y-%m-%d')}{' (quick run)' if args.quick else ''}", "",
             "| figure | helpers, SecureNN | helpers, ABY3 | plaintext Keras "
             "| private (best) / plaintext | stock tfe.serving (SecureNN) "
             "| best helpers vs stock |", "|---|---|---|---|---|---|---|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(table)
    print("\n" + text)
    (out / "benchmark.md").write_text(text + "\n")
    plot({"private, helpers SecureNN": snb, "private, helpers ABY3": a3b,
          "private, stock tfe.serving": {b: stock[b] for b in BATCHES},
          "plaintext Keras": plain,
          "floor: SecureNN alone, one process": floor["securenn"],
          "floor: ABY3 alone, one process": floor["aby3"]}, out / "benchmark.png")
    return 0


def plot(series: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, figures in series.items():
        style = "x--" if label.startswith("floor") else "o-"  # floors: dashed
        left.plot(BATCHES, [figures[b]["median"] * 1000 for b in BATCHES], style, label=label)
        right.plot(BATCHES, [figures[b]["images_per_s"] for b in BATCHES], style, label=label)
    for axis, ylabel in ((left, "median latency per query (ms)"), (right, "images per second")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("batch size")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize="small")
    fig.suptitle("Private vs plaintext prediction, seed CNN on MNIST")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    helpers.compat.quiet_disconnect_noise()  # TensorFlow's lines once workers are gone
    sys.exit(main())
