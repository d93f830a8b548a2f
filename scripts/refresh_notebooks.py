"""Re-execute the notebooks and store their outputs, as a reader runs them.

For each edition (English, then Brazilian Portuguese): 01 alone, then 02 and
03 at the same time in two kernels, so 03's queries are answered by 02's
workers. Outputs are written back into the notebook files.

    .venv/bin/python scripts/refresh_notebooks.py [--edition notebooks]

Check the result with ``git diff`` and with tests/test_notebook_files.py
(stored outputs must hold no machine paths or TensorFlow log noise).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
EDITIONS = [ROOT / "notebooks", ROOT / "translations" / "pt-BR"]
CELL_TIMEOUT = 900  # seconds, as in the nbval runs


def execute(path: Path, errors: list) -> None:
    """Run every cell of ``path`` in a fresh kernel in its folder; save the outputs."""
    began = time.monotonic()
    notebook = nbformat.read(path, as_version=4)
    # record_timing=False: no execution timestamps in the stored cells.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except Exception as exc:  # reported after both kernels are done
        errors.append(f"{path.relative_to(ROOT)}: {type(exc).__name__}: {exc}")
        return
    nbformat.write(notebook, path)
    print(f"  {path.relative_to(ROOT)}: {time.monotonic() - began:.0f} s", flush=True)


def refresh(folder: Path) -> list:
    errors: list = []
    print(f"{folder.relative_to(ROOT)}:", flush=True)
    execute(folder / "01_train.ipynb", errors)
    if errors:
        return errors
    together = [threading.Thread(target=execute, args=(folder / name, errors))
                for name in ("02_serve.ipynb", "03_query.ipynb")]
    for thread in together:
        thread.start()
    for thread in together:
        thread.join()
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edition", action="append", help="a folder of notebooks (default: both)")
    args = parser.parse_args()
    folders = [ROOT / e for e in args.edition] if args.edition else EDITIONS
    errors = [error for folder in folders for error in refresh(folder)]
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
