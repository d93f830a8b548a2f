"""Benchmark: private prediction against plaintext Keras, in one run.

    bash run.sh bench            # full run (about 35 minutes on 2 cores)
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
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

import helpers
from helpers.models import MODELS, as_model_input, seed_cnn, train_seed_cnn

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


def serve(config: Path, weights: Path, batch: int, requests: int, protocol: str,
          kind: str = "seed", max_requests: int = 1, name: str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "helpers", "serve", "--config", str(config), "--weights",
         str(weights), "--batch", str(batch), "--requests", str(requests), "--timeout", "1800",
         "--name", name or f"bench-{protocol}-{batch}", "--protocol", protocol, "--quiet",
         "--model", kind, "--max-requests", str(max_requests)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _finish(server: subprocess.Popen) -> None:
    """Wait for a serving process that has answered everything (bounded)."""
    server.wait(timeout=600)


def _stop(process: Optional[subprocess.Popen]) -> None:
    """Stop a process that is still running (after a failure), by its PID."""
    if process is not None and process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


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


def _end_owner(owner: subprocess.Popen) -> None:
    """SIGTERM the model owner if it still runs: it stops its workers, then exits."""
    if owner.poll() is None:
        owner.terminate()
        owner.wait(timeout=30)


def _wait_for_file(path: Path, owner: subprocess.Popen, timeout: float) -> None:
    """Wait until ``path`` exists; fail at once if ``owner``, who writes it, has exited."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if owner.poll() is not None:
            raise RuntimeError(f"the model owner exited (status {owner.returncode}) "
                               f"before writing {path.name}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model owner wrote no {path.name} within {timeout:.0f} s")
        time.sleep(0.1)


def _owner_logs(folder: Path) -> str:
    """The end of the workers' logs that the model owner left in ``folder``."""
    try:
        # The file name is the one scripts/first_answer.py writes.
        return "The workers' logs end with:\n" + (folder / "worker_logs.txt").read_text()
    except OSError:
        return "(the model owner left no worker logs)"


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
            _wait_for_file(folder / "cluster.json", owner, timeout=300)
            cluster = helpers.TFECluster.load(folder / "cluster.json", timeout=300, verbose=False)
            client = helpers.TFEWorker()
            client.connect_to_model((1, 28, 28, 1), (1, 10), cluster, timeout=300)
            client.query_model(x[:1], timeout=300)
            answered = time.time()
            out, _ = owner.communicate(timeout=120)
        except Exception as error:
            _end_owner(owner)
            raise RuntimeError(f"{protocol}: the first answer failed: {error}\n"
                               f"{_owner_logs(folder)}") from error
        finally:
            _end_owner(owner)
        if owner.returncode != 0:
            raise RuntimeError(f"the model owner failed (status {owner.returncode}): {out}\n"
                               f"{_owner_logs(folder)}")
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


def _wait_for_line(proc: subprocess.Popen, expected: str, timeout: float,
                   what: str = "the stock server") -> None:
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
            raise RuntimeError(f"{what} exited (status {proc.wait()}) before '{expected}'")
        pending += chunk
        if expected.encode() in (line.strip() for line in pending.split(b"\n")):
            return
    raise RuntimeError(f"{what} did not print '{expected}' within {timeout:.0f} s")


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


def floor_figures(weights: Path, protocol: str, kind: str = "seed",
                  batches: tuple = BATCHES) -> dict:
    """The private computation alone, in one process (scripts/protocol_floor.py)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "protocol_floor.py"), protocol,
                           ",".join(map(str, batches)), "--weights", str(weights), "--model",
                           kind], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"protocol_floor.py {protocol} failed:\n{proc.stderr[-2000:]}")
    figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            figures[row["batch"]] = {"median": row["median_s"], "images_per_s": row["images_per_s"]}
    small, large = min(batches), max(batches)
    print(f"{kind} {protocol} alone, one process: batch {small} "
          f"{figures[small]['median'] * 1000:.0f} ms"
          + (f", batch {large}" if large != small else ",")
          + f" {figures[large]['images_per_s']:.0f} images/s", flush=True)
    return figures


CLIENTS = 4  # clients querying at once, each at batch 1


def _next_json(proc: subprocess.Popen):
    """The next line of ``proc``'s output that is JSON (libraries may print other lines)."""
    for line in proc.stdout:
        if line.startswith(("[", "{")):
            return json.loads(line)
    raise RuntimeError(f"the process ended (status {proc.wait()}) without its figures")


def side_by_side(cluster, config: Path, weights: Path, kind: str, protocol: str, batch: int,
                 queries: int, x: np.ndarray, rounds: int = 10) -> dict:
    """Median time per call of the distributed floor and of serving, in alternating rounds.

    The floor's driver and a serving process both stay connected to the same
    workers, and take turns (this process is the serving's client), so that
    the machine's drift, which is large on shared machines, hits both alike.
    """
    name = f"floor-{kind}-{protocol}-{batch}"
    floor = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "protocol_floor.py"),
                              protocol, str(batch), "--weights", str(weights), "--model", kind,
                              "--config", str(config), "--interleaved"], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server = None
    floor_times, served_times = [], []
    try:
        _wait_for_line(floor, "ready", 600, what="the distributed floor")
        server = serve(config, weights, batch, queries + 1, protocol, kind=kind, name=name)
        client = helpers.TFEWorker()
        client.connect_to_model((batch, 28, 28, 1), (batch, 10), cluster, timeout=600,
                                model_name=name)
        client.query_model(x[:batch], timeout=600)  # the first query, untimed
        per_round = max(1, queries // rounds)
        for i in range(queries):
            if i % per_round == 0:
                floor.stdin.write(f"{per_round}\n")
                floor.stdin.flush()
                floor_times += _next_json(floor)
            sample = x[(i * batch) % 9000:(i * batch) % 9000 + batch]
            began = time.perf_counter()
            client.query_model(sample, timeout=600)
            served_times.append(time.perf_counter() - began)
        floor.stdin.write("done\n")
        floor.stdin.flush()
        json.loads(floor.communicate(timeout=300)[0].strip().splitlines()[-1])  # its check passed
        if floor.returncode != 0:
            raise RuntimeError(f"the distributed floor failed (status {floor.returncode})")
        _finish(server)
    finally:
        _stop(floor)
        _stop(server)
    result = {}
    for key, times in (("floor", floor_times), ("served", served_times)):
        median = float(np.median(times))
        result[key] = {"median": median, "images_per_s": batch / median}
    return result


def concurrent_figures(config: Path, weights: Path, kind: str, protocol: str,
                       queries: int, rounds: int = 5) -> dict:
    """`CLIENTS` client processes at batch 1, all at once, next to the floor at batch `CLIENTS`.

    As in `side_by_side`, the floor's driver and the serving process stay
    connected to the same workers and take turns in ``rounds`` rounds: the
    floor's calls, then ``queries // rounds`` queries from every client at
    once. The figures are the medians over the rounds: ``images_per_s`` while
    all clients are asking (`_all_asking`), ``whole_round`` from the round's
    start to its last answer, which also counts the clients' staggered start
    and finish.
    """
    name = f"together-{kind}-{protocol}"
    floor = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "protocol_floor.py"),
                              protocol, str(CLIENTS), "--weights", str(weights), "--model", kind,
                              "--config", str(config), "--interleaved"], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server, clients = None, []
    per_round = max(1, queries // rounds)
    floor_times, together, whole, rows = [], [], [], []
    try:
        _wait_for_line(floor, "ready", 600, what="the distributed floor")
        server = serve(config, weights, 1, CLIENTS * (per_round * rounds + 1), protocol,
                       kind=kind, max_requests=CLIENTS, name=name)
        script = str(ROOT / "scripts" / "concurrent_clients.py")
        clients = [subprocess.Popen([sys.executable, script, str(config), name, str(weights),
                                     kind, str(i * queries), str(per_round * rounds)], cwd=ROOT,
                                    text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                   for i in range(CLIENTS)]
        for client in clients:
            # Skip the progress lines of connecting ("still waiting ..."), bounded.
            _wait_for_line(client, "ready", 600, what="a concurrent client")
        for _ in range(rounds):
            floor.stdin.write(f"{max(6, 60 // rounds)}\n")
            floor.stdin.flush()
            floor_times += _next_json(floor)
            for client in clients:  # all connected and warm: go together
                client.stdin.write(f"{per_round}\n")
                client.stdin.flush()
            batch = [_next_json(client) for client in clients]
            whole.append(sum(r["queries"] for r in batch) / (
                max(r["answered"][-1] for r in batch) - min(r["started"] for r in batch)))
            together.append(_all_asking(batch))
            rows += batch
        for process in [floor] + clients:
            process.stdin.write("done\n")
            process.stdin.flush()
        json.loads(floor.communicate(timeout=300)[0].strip().splitlines()[-1])  # its check passed
        if floor.returncode != 0:
            raise RuntimeError(f"the distributed floor failed (status {floor.returncode})")
        for client in clients:
            client.communicate(timeout=300)
        _finish(server)
    finally:
        for process in [floor] + clients:
            _stop(process)
        _stop(server)
    total = sum(row["queries"] for row in rows)
    same = sum(row["same_class"] for row in rows)
    if same != total:
        raise RuntimeError(f"{kind} {protocol}: {total - same} of {total} answers to concurrent "
                           "clients did not match plaintext's class")
    median = float(np.median(floor_times))
    return {"images_per_s": float(np.median(together)),
            "whole_round": float(np.median(whole)), "same_class": same, "queries": total,
            "max_logit_diff": max(row["max_logit_diff"] for row in rows),
            "floor": {"median": median, "images_per_s": CLIENTS / median}}


def _all_asking(rows: list) -> float:
    """Images per second in all, while every client of a round is asking.

    From the moment the last client has its first answer to the moment the
    first client has its last one, every client is querying. Each client's
    rate over its answers in that span (one fewer than the answers, over the
    time from the first to the last) adds up to the server's rate under all
    clients at once, without the round's ragged start and end.
    """
    begin = max(row["answered"][0] for row in rows)
    end = min(row["answered"][-1] for row in rows)
    total = 0.0
    for row in rows:
        inside = [t for t in row["answered"] if begin <= t <= end]
        if len(inside) < 2 or inside[-1] <= inside[0]:
            raise RuntimeError("a round too short to measure: ask for more queries per round")
        total += (len(inside) - 1) / (inside[-1] - inside[0])
    return total


def against_the_floor(kind: str, weights: Path, x: np.ndarray, queries: int,
                      protocols: tuple = PROTOCOLS) -> dict:
    """Serving next to the distributed floor, on three fresh workers of its own per model."""
    figures: dict = {}
    config = weights.with_suffix(".cluster.json")
    workers = [helpers.TFEWorker(name=n) for n in ("alice", "bob", "carol")]
    with helpers.TFECluster(*workers, verbose=False) as cluster:
        cluster.save(config)
        for protocol in protocols:
            big = (100,) if kind == "seed" else ()
            floor: dict = {}
            row = {"floor": floor, "served": {}}
            for batch, count in ((1, queries),) + tuple((b, 10) for b in big):
                pair = side_by_side(cluster, config, weights, kind, protocol, batch, count, x)
                floor[batch], row["served"][batch] = pair["floor"], pair["served"]
            row["together"] = concurrent_figures(config, weights, kind, protocol,
                                                 max(10, queries // 2))
            floor[CLIENTS] = row["together"]["floor"]
            figures[protocol] = row
            print(f"{kind} {protocol}: batch 1 {row['served'][1]['median'] * 1000:.0f} ms, "
                  f"distributed floor {floor[1]['median'] * 1000:.0f} ms "
                  f"({row['served'][1]['median'] / floor[1]['median']:.2f}x); {CLIENTS} clients "
                  f"at once {row['together']['images_per_s']:.1f} images/s (whole rounds "
                  f"{row['together']['whole_round']:.1f}), floor at batch "
                  f"{CLIENTS} {floor[CLIENTS]['images_per_s']:.1f} "
                  f"({row['together']['images_per_s'] / floor[CLIENTS]['images_per_s']:.2f}x)",
                  flush=True)
    return figures


def floor_table(figures: dict, in_process: dict, stock: dict) -> list:
    """Markdown rows: each serving figure against the floors (and stock, where measured)."""
    lines = ["| figure | in-process floor | distributed floor | helpers | helpers / distributed "
             "floor | helpers / in-process floor | stock / helpers |", "|---|---|---|---|---|---|---|"]
    titles = {"seed": "seed CNN", "lenet": "LeNet-like CNN"}
    for kind, by_protocol in figures.items():
        for protocol in by_protocol:
            title = f"{titles[kind]}, {'SecureNN' if protocol == 'securenn' else 'ABY3'}"
            row, alone = by_protocol[protocol], in_process[kind][protocol]
            floor, served = row["floor"], row["served"]
            stock_b1 = (f"{stock[1]['median'] / served[1]['median']:.2f}x"
                        if stock and kind == "seed" and protocol == "securenn" else "")
            lines.append(f"| {title}, batch-1 median | {alone[1]['median'] * 1000:.1f} ms "
                         f"| {floor[1]['median'] * 1000:.1f} ms "
                         f"| {served[1]['median'] * 1000:.1f} ms "
                         f"| {served[1]['median'] / floor[1]['median']:.2f}x "
                         f"| {served[1]['median'] / alone[1]['median']:.2f}x | {stock_b1} |")
            if 100 in served:
                lines.append(f"| {title}, batch 100 | {alone[100]['images_per_s']:.0f} img/s "
                             f"| {floor[100]['images_per_s']:.0f} img/s "
                             f"| {served[100]['images_per_s']:.0f} img/s "
                             f"| {served[100]['images_per_s'] / floor[100]['images_per_s']:.2f}x "
                             f"| {served[100]['images_per_s'] / alone[100]['images_per_s']:.2f}x |"
                             f" |")
            together = row["together"]["images_per_s"]
            lines.append(f"| {title}, {CLIENTS} clients at batch 1 at once (floors: batch "
                         f"{CLIENTS}) | {alone[CLIENTS]['images_per_s']:.0f} img/s "
                         f"| {floor[CLIENTS]['images_per_s']:.0f} img/s | {together:.0f} img/s "
                         f"| {together / floor[CLIENTS]['images_per_s']:.2f}x "
                         f"| {together / alone[CLIENTS]['images_per_s']:.2f}x | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench-results"))
    parser.add_argument("--floors-only", action="store_true",
                        help="only serving against the floors (both models), about 15 minutes")
    parser.add_argument("--pairs", default="",
                        help='with --floors-only: only these, e.g. "seed:aby3,lenet:securenn"')
    args = parser.parse_args()
    # Checked before the minutes of training, not after.
    wrong = [pair for pair in args.pairs.split(",") if pair and (
        len(pair.split(":")) != 2 or pair.split(":")[0] not in MODELS
        or pair.split(":")[1] not in PROTOCOLS)]
    if wrong:
        parser.error(f"--pairs: not MODEL:PROTOCOL with MODEL in {', '.join(MODELS)} and "
                     f"PROTOCOL in {', '.join(PROTOCOLS)}: {', '.join(wrong)}")
    latency_queries = 30 if args.quick else 200
    agreement_images = 1000 if args.quick else 10000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (x_train, y_train), (x_test, y_test) = helpers.load_mnist()
    x_all = as_model_input(x_test)
    print("Training the seed CNN (3 epochs) and the LeNet-like CNN (2 epochs) ...", flush=True)
    model = train_seed_cnn(as_model_input(x_train), y_train, epochs=3, verbose=False)
    accuracy = float(np.mean(model.predict(x_all, verbose=0).argmax(1) == y_test))
    lenet = train_seed_cnn(as_model_input(x_train), y_train, epochs=2, verbose=False,
                           kind="lenet")

    with tempfile.TemporaryDirectory(prefix="tfe-bench-") as tmp:
        weights, config = Path(tmp) / "w.h5", Path(tmp) / "cluster.json"
        model.save_weights(weights)
        kinds = {"seed": weights, "lenet": Path(tmp) / "lenet.h5"}
        lenet.save_weights(kinds["lenet"])
        # Everything plaintext happens before this process connects to the workers.
        plain = plaintext_figures(weights, x_all, latency_queries)
        plain_logits = plaintext_logits(weights, x_all[:agreement_images])

        if args.floors_only:
            pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",") if pair] or [
                (kind, p) for kind in kinds for p in PROTOCOLS]
            chosen = {kind: tuple(p for k, p in pairs if k == kind) for kind in kinds}
            chosen = {kind: protocols for kind, protocols in chosen.items() if protocols}
            in_process = {kind: {p: floor_figures(kinds[kind], p, kind, (1, CLIENTS) + (
                (100,) if kind == "seed" else ())) for p in protocols}
                for kind, protocols in chosen.items()}
            against = {kind: against_the_floor(kind, kinds[kind], x_all, latency_queries,
                                               protocols)
                       for kind, protocols in chosen.items()}
            text = "\n".join(floor_table(against, in_process, None))
            print("\n" + text)
            (out / "floors.md").write_text(text + "\n")
            return 0
        floor = {protocol: floor_figures(weights, protocol) for protocol in PROTOCOLS}
        in_process = {"seed": {p: {**floor[p], **floor_figures(weights, p, "seed", (CLIENTS,))}
                               for p in PROTOCOLS},
                      "lenet": {p: floor_figures(kinds["lenet"], p, "lenet", (1, CLIENTS))
                                for p in PROTOCOLS}}
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
        print("Serving against the distributed floor, fresh workers per model ...", flush=True)
        against = {kind: against_the_floor(kind, path, x_all, latency_queries)
                   for kind, path in kinds.items()}
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
    table += ["", "Against the floors (the distributed floor is the served computation driven "
              "directly on the same workers: no queues, no serving loop):", ""]
    table += floor_table(against, in_process, stock)
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
