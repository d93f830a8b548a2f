"""Run every test the way a reader would, stage by stage (``bash run.sh test``).

1. unit and integration tests of ``helpers`` (plus the translation sync check);
2. for each edition (English, then Brazilian Portuguese): notebook 01 alone,
   then notebooks 02 and 03 *at the same time* in two kernels (pytest-xdist),
   so 03's queries are answered by 02's live workers;
3. a final check that no worker process of ours is left running.

Before anything else it checks that our compiled secure-randomness op is
active: the suite never passes on the weaker fallback (only the fallback's
own tests switch it on, on purpose, in their own processes).

Prints one closing line with the totals, e.g. ``total: 80 passed, 0 failed``.
``--helpers-only`` runs stage 1 alone (``bash run.sh test-on 3.13`` does).
Other arguments are passed to the first stage (for example ``-k cluster``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDITIONS = [ROOT / "notebooks", ROOT / "translations" / "pt-BR"]
NBVAL = ["--nbval-lax", "--nbval-cell-timeout=900", "-p", "no:randomly"]
COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")
SUMMARY = re.compile(r"^=*\s*\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s\b")


def run_stage(title: str, args: list) -> dict:
    """Run one pytest stage; return its counts (a crash counts as one failure)."""
    print(f"\n=== {title}", flush=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(proc.stdout, end="", flush=True)
    # pytest's closing line ("=== 3 passed in 1.2s ==="), wherever it is: a
    # warning printed as the interpreter exits may come after it.
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if SUMMARY.match(line.strip())), "")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for number, word in COUNT.findall(summary):
        key = "failed" if word.startswith("error") else word
        counts[key] = counts.get(key, 0) + int(number)
    if (proc.returncode != 0 or counts["passed"] == 0) and counts["failed"] == 0:
        # pytest crashed, collected nothing, or printed no summary: never a silent pass
        counts["failed"] = 1
    print(f"--- {title}: {counts['passed']} passed, {counts['failed']} failed "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return counts


def randomness_problem() -> str:
    """Why the compiled randomness op is not active here ("" when it is)."""
    if os.environ.get("TFE_HELPERS_RANDOMNESS"):
        return ("TFE_HELPERS_RANDOMNESS is set; unset it: the suite runs on the compiled op, "
                "and the fallback's tests switch the fallback on by themselves")
    from helpers import randomness

    source = randomness.source()
    return "" if source.secure else source.reason


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = sys.argv[1:]
    helpers_only = "--helpers-only" in args
    args = [arg for arg in args if arg != "--helpers-only"]
    problem = randomness_problem()
    if problem:
        print(f"error: the compiled secure-randomness op is not active: {problem}\n"
              "Fix it first (`python -m helpers doctor` says how); the tests never pass "
              "on the fallback.\n\ntotal: 0 passed, 1 failed, 0 skipped")
        return 1
    print(f"Python {sys.version.split()[0]}; randomness: compiled op", flush=True)
    # One records folder for the whole run, so the leftover check sees all of it.
    made_home = "TFE_HELPERS_HOME" not in os.environ
    if made_home:
        os.environ["TFE_HELPERS_HOME"] = tempfile.mkdtemp(prefix="tfe-helpers-run-")
    os.environ["TFE_HELPERS_RUN_HOME"] = os.environ["TFE_HELPERS_HOME"]
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    stages = [("helpers: unit and integration tests", ["tests", *args])]
    for folder in ([] if helpers_only else EDITIONS):
        edition = folder.relative_to(ROOT)
        stages.append((f"{edition}: 01 (training)", [*NBVAL, str(folder / "01_train.ipynb")]))
        stages.append((f"{edition}: 02 and 03 together (serve + query)",
                       [*NBVAL, "-n", "2", "--dist", "loadfile",
                        str(folder / "02_serve.ipynb"), str(folder / "03_query.ipynb")]))
        # As in a hosted notebook: nothing served, so 03 starts and stops its own.
        stages.append((f"{edition}: 03 on its own", [*NBVAL, str(folder / "03_query.ipynb")]))
    stages.append(("no worker process left behind", ["tests/leftovers.py"]))
    if helpers_only:
        stages[0] = (f"helpers on Python {sys.version.split()[0]}: unit and integration tests",
                     stages[0][1])
    for title, args in stages:
        for key, value in run_stage(title, args).items():
            totals[key] = totals.get(key, 0) + value
    if made_home and totals["failed"]:
        print(f"\nThe workers' logs and records of this run are kept in "
              f"{os.environ['TFE_HELPERS_HOME']}")
    elif made_home:
        shutil.rmtree(os.environ["TFE_HELPERS_HOME"], ignore_errors=True)
    print(f"\ntotal: {totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if totals["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
