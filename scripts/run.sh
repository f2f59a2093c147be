#!/usr/bin/env bash
# The two set-up commands of the README, and what CI runs.
#   scripts/run.sh quickstart [--headless] [--out DIR]   install, then open (or execute) the quickstart
#   scripts/run.sh test [--latest] [pytest args...]       install, then run the whole test suite
#   scripts/run.sh env [--latest]                         install only
#   scripts/run.sh lock                                   re-resolve requirements.lock (the only command that changes it)
#
# By default the venv (.venv) holds exactly the versions in requirements.lock: every package, transitive ones
# included, so a fresh clone installs today what it installed the day the lock was written. The lock covers CPython
# 3.11 on Linux x86_64 with the CPU build of torch. `--latest` instead resolves the newest versions pyproject.toml
# allows (torch and triton pinned as in constraints-cpu.txt) into a separate venv (.venv-latest), so upstream drift
# is met on purpose, and prints where it differs from the lock.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

LOCK="requirements.lock"
LOCK_PYTHON="3.11"
LOCK_PLATFORM="x86_64-manylinux_2_28"
UV_VERSION="0.13.9"   # the same pin as the `setup` group of pyproject.toml

die() { echo "[sae_widgets] $*" >&2; exit 2; }

# torch==2.13.0+cpu is not on PyPI. The lock names it without saying where it comes from: a local wheel folder that
# pip's config names (this project's machines), else PyTorch's CPU index. uv does not read pip's config.
torch_source() {
    local fl found=0
    for fl in $(python3 -m pip config get global.find-links 2>/dev/null || true); do
        [[ -d "$fl" ]] && { echo "--find-links"; echo "$fl"; found=1; }
    done
    if [[ "$found" == 0 ]]; then
        echo "--extra-index-url"; echo "https://download.pytorch.org/whl/cpu"
        echo "--index-strategy"; echo "unsafe-best-match"
    fi
}

# The interpreter the lock was resolved for (any CPython 3.11); --latest takes python3 as it is.
lock_python() {
    local py
    for py in python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 \
            && [[ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == "$LOCK_PYTHON" ]]; then
            command -v "$py"; return 0
        fi
    done
    die "requirements.lock covers CPython $LOCK_PYTHON on Linux x86_64, and no python$LOCK_PYTHON is on PATH" \
        "(python3 is $(python3 -V 2>&1)); install Python $LOCK_PYTHON, or use 'scripts/run.sh test --latest'" \
        "to resolve for this Python"
}

# A venv at $1 made by interpreter $2, with uv $UV_VERSION in it; prints the venv's python.
venv_with_uv() {
    local venv="$1" base="$2" py="$1/bin/python"
    [[ -x "$py" ]] || "$base" -m venv "$venv"
    if [[ "$("$py" -m uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]]; then
        "$py" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" >&2
    fi
    echo "$py"
}

ensure_locked() {
    VENV="${SAE_WIDGETS_VENV:-$ROOT/.venv}"
    PY="$VENV/bin/python"
    local stamp="$VENV/.sae_widgets-install" want
    want="locked $(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import sae_widgets" 2>/dev/null; then
        return 0
    fi
    [[ "$(uname -sm)" == "Linux x86_64" ]] || die "requirements.lock covers Linux x86_64, not $(uname -sm);" \
        "use 'scripts/run.sh test --latest' to resolve for this machine"
    echo "[sae_widgets] installing requirements.lock into $VENV" >&2
    PY="$(venv_with_uv "$VENV" "$(lock_python)")"
    local -a src; mapfile -t src < <(torch_source)
    # sync: exactly the lock, nothing more (a package an older lock left behind is removed)
    "$PY" -m uv pip sync --python "$PY" "${src[@]}" "$LOCK"
    # the project itself, built by the locked setuptools (no isolated build env with the newest one)
    "$PY" -m uv pip install --python "$PY" --no-deps --no-build-isolation -e .
    echo "$want" > "$stamp"
}

ensure_latest() {
    VENV="${SAE_WIDGETS_VENV:-$ROOT/.venv-latest}"
    echo "[sae_widgets] --latest: resolving the newest versions pyproject.toml allows into $VENV" >&2
    PY="$(venv_with_uv "$VENV" python3)"
    local -a src; mapfile -t src < <(torch_source)
    "$PY" -m uv pip install --python "$PY" --upgrade "${src[@]}" -c constraints-cpu.txt -e ".[test,real-models]"
    echo "[sae_widgets] --latest differs from $LOCK in:" >&2
    "$PY" -m uv pip freeze --python "$PY" --exclude-editable | sort > "$VENV/.freeze"
    grep -E '^[A-Za-z0-9_.-]+==' "$LOCK" | sort | diff - "$VENV/.freeze" | grep -E '^[<>]' | sed 's/^</  lock:  /; s/^>/  latest:/' >&2 || true
}

ensure_env() {
    if [[ "${1:-}" == "--latest" ]]; then ensure_latest; else ensure_locked; fi
}

# Re-resolve the lock for CPython 3.11 on Linux x86_64 (any host can write it: uv resolves for the target).
write_lock() {
    local venv="$ROOT/.venv-lock" py
    py="$(venv_with_uv "$venv" python3)"
    local -a src; mapfile -t src < <(torch_source)
    "$py" -m uv pip compile pyproject.toml --extra test --extra real-models --group setup -c constraints-cpu.txt \
        "${src[@]}" --python-version "$LOCK_PYTHON" --python-platform "$LOCK_PLATFORM" \
        --custom-compile-command "bash scripts/run.sh lock" --upgrade -o "$LOCK"
    echo "[sae_widgets] wrote $LOCK ($(grep -cE '^[A-Za-z0-9_.-]+==' "$LOCK") packages); commit it" >&2
}

# The widget tests drive Debian's chromium (never a browser build downloaded by playwright). Installed once,
# quietly; a machine where it cannot be installed still runs the rest of the suite.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    local log; log="$(mktemp)"
    echo "[sae_widgets] installing Debian's chromium for the browser tests" >&2
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
        && { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
        rm -f "$log"
    else
        echo "[sae_widgets] could not install chromium (needs root and apt-get); the browser tests will fail:" >&2
        tail -n 20 "$log" >&2; rm -f "$log"
    fi
}

cmd="${1:-}"; shift || true
mode=""
if [[ "${1:-}" == "--latest" ]]; then mode="--latest"; shift; fi
case "$cmd" in
    quickstart) ensure_env "$mode"; exec "$PY" -m sae_widgets quickstart "$@" ;;
    test)       ensure_env "$mode"; ensure_chromium; exec "$PY" -m pytest "$@" ;;
    env)        ensure_env "$mode" ;;
    lock)       [[ -z "$mode" ]] || die "lock takes no --latest"; write_lock ;;
    *) echo "usage: scripts/run.sh {quickstart [--latest] [--headless] [--out DIR] | test [--latest] [pytest args]" \
            "| env [--latest] | lock}" >&2; exit 2 ;;
esac
