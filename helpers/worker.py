"""``python -m helpers.worker NAME --config FILE``: one MPC worker, with our fixes.

TF Encrypted places its random-number ops on the workers' devices, so every
worker must have our secure-randomness op loaded, and must import TF
Encrypted with the same compatibility fixes as the driver. Importing the
``helpers`` package does both (see `helpers.compat.prepare`); then this runs
TF Encrypted's own player, unchanged, with the same arguments.
"""
from __future__ import annotations

import runpy
import sys
from typing import List, Optional

from . import randomness


def main(argv: Optional[List[str]] = None) -> None:
    """Run TF Encrypted's player (``tf_encrypted.player``) with ``argv``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m helpers.worker NAME --config FILE\n"
              "  NAME: server0, server1 or server2; FILE: the cluster's JSON hostmap")
        return
    source = randomness.source()
    print(f"helpers worker {args[0]}: randomness from the {source.describe()}", flush=True)
    sys.argv = ["tf_encrypted.player", *args]
    runpy.run_module("tf_encrypted.player", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
