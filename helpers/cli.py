"""``python -m helpers``: start, inspect and stop workers; serve; query; demo.

So that a reader never needs ``ps | grep | kill``: every worker is known by
the pid file its cluster wrote, and is stopped by PID.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from . import processes


def _cmd_start(args: argparse.Namespace) -> int:
    from .cluster import TFECluster, TFEWorker

    hosts = args.hosts.split(",") if args.hosts else [None, None, None]
    if len(hosts) != 3:
        print("error: --hosts takes three HOST:PORT addresses, comma-separated", file=sys.stderr)
        return 2
    workers = [TFEWorker(host=h, name=n) for h, n in zip(hosts, ("alice", "bob", "carol"))]
    cluster = TFECluster(*workers).start(timeout=args.timeout)
    cluster.save(args.config)
    print(f"Cluster config written to {args.config}. Press Ctrl-C to stop the workers.")
    # Ctrl-C lands below; SIGTERM exits with status 143 through the handler
    # that start() installed. Either way `finally` stops the workers.
    try:
        while True:
            time.sleep(1.0)
            cluster.check(during="while the cluster runs")
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    rows = processes.list_clusters()
    if not rows:
        print("No clusters recorded.")
        return 0
    for row in rows:
        owner = "running" if row["owner_alive"] else "gone (stale: `python -m helpers cleanup`)"
        print(f"cluster {row['folder'].name}  owner pid {row['owner_pid']}: {owner}")
        for role, info in row["workers"].items():
            state = "running" if role in row["alive"] else "not running"
            print(f"  {info.get('name', role):>6} ({role}) pid {info['pid']:>7}  "
                  f"{info.get('host')}  {state}")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    stopped = 0
    for row in processes.list_clusters():
        if not args.all and not row["folder"].name.startswith(args.cluster or "\0"):
            continue
        for role, info in row["alive"].items():
            print(f"Stopping {info.get('name', role)} (pid {info['pid']})")
            processes.terminate(info["pid"], info.get("start_time"), grace=args.grace)
            stopped += 1
    if stopped == 0:
        print("No matching running workers." if (args.all or args.cluster)
              else "Name a cluster id (see `status`) or pass --all.")
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    stopped = processes.cleanup_stale()
    print(f"Stopped {len(stopped)} stale worker(s).")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import share
    from .cluster import TFECluster
    from .models import load

    cluster = TFECluster.load(args.config, timeout=args.timeout, verbose=not args.quiet)
    model = load(args.weights, args.model, batch_size=args.batch)
    shared = share(model, cluster, name=args.name, timeout=args.timeout, verbose=not args.quiet,
                   protocol=args.protocol, max_requests=args.max_requests)
    try:
        # --timeout bounds a fixed number of requests; serving until killed has no end.
        served = shared.serve(num_requests=args.requests,
                              timeout=None if args.requests is None else args.timeout)
    finally:
        shared.stop()
    if args.quiet:  # one machine-readable line, for scripts/benchmark.py
        print(f"shared_s={shared.share_seconds:.2f} served={served}")
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from . import load_mnist
    from .client import predict_each
    from .cluster import TFECluster
    from .models import as_model_input, plaintext_logits

    (_, _), (x_test, y_test) = load_mnist()
    start = args.first
    x = as_model_input(x_test[start:start + args.images])
    labels = y_test[start:start + args.images]
    # Plaintext reference first: see `plaintext_logits`.
    plain = plaintext_logits(args.weights, x) if args.weights else None
    cluster = TFECluster.load(args.config, timeout=args.timeout, verbose=not args.json)
    for answer in predict_each(x, cluster, timeout=args.timeout):
        i = answer.index
        row = {"index": start + i, "label": int(labels[i]), "predicted": int(answer.logits.argmax()),
               "logits": answer.logits.tolist(), "opened_on": answer.opened_on,
               "protocol": answer.protocol, "seconds": round(answer.seconds, 4)}
        if plain is not None:
            row["plaintext"] = plain[i].tolist()
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            verdict = "correct" if row["predicted"] == row["label"] else "wrong"
            print(f"image {row['index']}: true {row['label']}, predicted {row['predicted']}, "
                  f"{verdict}", flush=True)
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    return doctor.run(with_workers=not args.no_workers)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(images=args.images, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="start three local workers; Ctrl-C stops them")
    p.add_argument("--config", default="cluster.json", help="where to write the hostmap")
    p.add_argument("--hosts", help="HOST:PORT,HOST:PORT,HOST:PORT (default: free local ports)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser("status", help="list recorded clusters and their workers")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("stop", help="stop the workers of a recorded cluster, by PID")
    p.add_argument("cluster", nargs="?", help="cluster id (or its start) from `status`")
    p.add_argument("--all", action="store_true", help="stop every recorded worker")
    p.add_argument("--grace", type=float, default=5.0, help="seconds before SIGKILL")
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("cleanup", help="stop workers left by a crashed kernel or script")
    p.set_defaults(func=_cmd_cleanup)

    p = sub.add_parser("serve", help="share a CNN's weights and serve requests")
    p.add_argument("--config", required=True, help="hostmap written by a running cluster")
    p.add_argument("--weights", required=True,
                   help="a whole saved model (.keras, as notebook 01 saves it), "
                   "or Keras weights (.h5) of the --model CNN")
    p.add_argument("--model", choices=("seed", "lenet"), default="seed",
                   help="with .h5 weights, which CNN: the tutorial's seed CNN, or the "
                   "benchmark's second one")
    p.add_argument("--requests", type=int, default=None, help="how many (default: until killed)")
    p.add_argument("--batch", type=int, default=1, help="batch size of one request")
    p.add_argument("--max-requests", type=int, default=1,
                   help="answer up to this many waiting requests in one computation")
    p.add_argument("--name", default="model", help="name clients use to find this model")
    p.add_argument("--protocol", choices=("securenn", "aby3"), default="securenn",
                   help="MPC protocol (clients follow whichever is served)")
    p.add_argument("--quiet", action="store_true", help="print only a summary line at the end")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds for finding the workers and sharing, and, with --requests, "
                   "for serving them")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("query", help="privately predict MNIST test images from a served model")
    p.add_argument("--config", required=True, help="hostmap written by a running cluster")
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--first", type=int, default=0, help="index of the first test image")
    p.add_argument("--weights", help="also compute plaintext logits from this model (.keras) "
                   "or these seed-CNN weights (.h5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=_cmd_query)

    p = sub.add_parser("doctor", help="check the set-up (paste its output when asking for help)")
    p.add_argument("--no-workers", action="store_true", help="skip starting three test workers")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("demo", help="train, serve and query end to end with real workers")
    p.add_argument("--images", type=int, default=10, help="test images to predict privately")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``python -m helpers``."""
    args = build_parser().parse_args(argv)
    from . import compat
    from .errors import HelpersError

    compat.quiet_disconnect_noise()  # a reader reads this process's stderr
    try:
        return args.func(args)
    except HelpersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
