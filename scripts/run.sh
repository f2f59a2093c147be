#!/usr/bin/env bash
# The two set-up commands of the README, and what CI runs.
#   scripts/run.sh quickstart [--headless] [--out DIR]   install, then open (or execute) the quickstart
#   scripts/run.sh test [pytest args...]                  install, then run the whole test suite
# Both create or reuse .venv (uv, with constraints-cpu.txt) and reinstall only when the dependency files change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SAE_WIDGETS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

ensure_env() {
    local stamp="$VENV/.sae_widgets-install" want
    want="$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$PY" -c "import sae_widgets" 2>/dev/null; then
        return 0
    fi
    echo "[sae_widgets] installing into $VENV" >&2
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m uv --version >/dev/null 2>&1 || "$PY" -m pip install -q --disable-pip-version-check uv
    # The local CPU torch wheel lives in the folder pip's config names; uv does not read pip's config.
    local -a links=()
    for fl in $(python3 -m pip config get global.find-links 2>/dev/null || true); do links+=(--find-links "$fl"); done
    "$PY" -m uv pip install --python "$PY" "${links[@]}" -c constraints-cpu.txt -e ".[test]"
    echo "$want" > "$stamp"
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
case "$cmd" in
    quickstart) ensure_env; exec "$PY" -m sae_widgets quickstart "$@" ;;
    test)       ensure_env; ensure_chromium; exec "$PY" -m pytest "$@" ;;
    env)        ensure_env ;;
    *) echo "usage: scripts/run.sh {quickstart [--headless] [--out DIR] | test [pytest args] | env}" >&2; exit 2 ;;
esac
