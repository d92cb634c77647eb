#!/usr/bin/env bash
# Interoperability tests against real third-party serving stacks (MLServer, the KServe model server).
#
# Sets up one virtual environment per server, because their pins conflict (kserve 0.21 needs
# starlette >= 1.3.1, MLServer 1.7.1 needs fastapi < 0.116; in one environment pip falls back to
# kserve 0.16). Each gets the CPU torch, tamperprobe (editable, so the tests run this checkout's
# current source, with its test extra) and one server package, and then runs that server's tests
# (pytest -m interop tests/interop/test_interop_NAME.py). Idempotent: an environment whose stamp (the
# server requirement, torch, Python and the project's dependencies in pyproject.toml) is unchanged is
# reused without calling pip. Bounded: every install step and every test run has a timeout, and the
# tests stop every server they start.
#
#   scripts/interop-setup.sh                 # set up (or reuse) both environments and run the tests
#   scripts/interop-setup.sh --setup-only    # only set them up
#   scripts/interop-setup.sh --fresh         # remove them first (to measure a cold install)
#   scripts/interop-setup.sh mlserver        # one server only (mlserver or kserve)
#
# Environment: TAMPERPROBE_INTEROP_HOME (where the environments live; default
# ~/.cache/tamperprobe-interop; each run's JUnit XML goes there as NAME-results.xml), MLSERVER_VERSION
# (1.7.1), KSERVE_VERSION (0.21.0), PYTHON (python3), INTEROP_INSTALL_TIMEOUT and
# INTEROP_TEST_TIMEOUT (seconds per step; 1200 each).
# Exit status: 0 when every test run passed, else the first failure's (2 for a bad argument).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

MLSERVER_VERSION=${MLSERVER_VERSION:-1.7.1}
KSERVE_VERSION=${KSERVE_VERSION:-0.21.0}
TORCH_VERSION=2.13.0 # the CPU build (see README); a plain "torch" requirement would pull a CUDA build
PYTHON=${PYTHON:-python3}
home=${TAMPERPROBE_INTEROP_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/tamperprobe-interop}
install_timeout=${INTEROP_INSTALL_TIMEOUT:-1200}
test_timeout=${INTEROP_TEST_TIMEOUT:-1200}

setup_only=0
fresh=0
servers=()
for arg in "$@"; do
  case "$arg" in
    --setup-only) setup_only=1 ;;
    --fresh) fresh=1 ;;
    mlserver | kserve) servers+=("$arg") ;;
    -h | --help)
      sed -n '2,22p' "$0"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (expected --setup-only, --fresh, mlserver or kserve)" >&2
      exit 2
      ;;
  esac
done
[ ${#servers[@]} -gt 0 ] || servers=(mlserver kserve)

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# pip_install VENV ARGS...: pip install, quiet unless it fails, within the install timeout
pip_install() {
  local venv=$1 log
  shift
  log=$(mktemp)
  if ! timeout "$install_timeout" "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2 || true
    rm -f "$log"
    echo "pip install $* failed (or took over $install_timeout s)" >&2
    return 1
  fi
  rm -f "$log"
}

# setup NAME REQUIREMENT: the environment $home/NAME with torch, tamperprobe[test] and REQUIREMENT
setup() {
  local name=$1 requirement=$2 venv="$home/$1"
  local stamp_text
  # what decides the environment's contents: the server requirement, torch, Python, the project's dependencies
  local deps
  deps=$("$PYTHON" -c 'import json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(json.dumps([p["dependencies"], p.get("optional-dependencies")]))' | sha256sum | cut -c1-16)
  stamp_text="$requirement torch==$TORCH_VERSION $("$PYTHON" --version 2>&1) deps:$deps"
  if [ "$fresh" = 1 ]; then
    rm -rf "$venv"
  fi
  if [ -f "$venv/.interop-stamp" ] && [ "$(cat "$venv/.interop-stamp")" = "$stamp_text" ] && [ -x "$venv/bin/python" ]; then
    echo "[$name] environment $venv is up to date"
    return 0
  fi
  local t0
  t0=$(now)
  echo "[$name] setting up $venv ($requirement)"
  rm -rf "$venv"
  mkdir -p "$home"
  "$PYTHON" -m venv "$venv"
  pip_install "$venv" "torch==$TORCH_VERSION"
  pip_install "$venv" -e "$repo[test]"
  # keep torch: the server package must not replace it (the constraint makes pip fail instead)
  printf 'torch==%s\n' "$TORCH_VERSION" >"$venv/constraints.txt"
  pip_install "$venv" -c "$venv/constraints.txt" "$requirement"
  "$venv/bin/python" - "$name" <<'EOF'
import importlib, importlib.metadata as md, sys
name = sys.argv[1]
importlib.import_module(name)  # fails the setup if the server package does not import
import tamperprobe, torch, numpy
print(f"[{name}] {name} {md.version(name)}, torch {torch.__version__}, numpy {numpy.__version__}, fastapi {md.version('fastapi')}")
EOF
  "$venv/bin/python" -m pip check --disable-pip-version-check 2>&1 | sed "s/^/[$name] pip check: /" || true
  echo "$stamp_text" >"$venv/.interop-stamp"
  echo "[$name] set up in $(elapsed "$t0") s; size $(du -sh "$venv" | cut -f1)"
}

status=0
for name in "${servers[@]}"; do
  case "$name" in
    mlserver) setup mlserver "mlserver==$MLSERVER_VERSION" ;;
    kserve) setup kserve "kserve==$KSERVE_VERSION" ;;
  esac
done
[ "$setup_only" = 1 ] && exit 0

for name in "${servers[@]}"; do
  venv="$home/$name"
  t0=$(now)
  echo "[$name] + python -m pytest -m interop tests/interop/test_interop_$name.py"
  rc=0
  timeout "$test_timeout" "$venv/bin/python" -m pytest -m interop -p no:cacheprovider -q --durations=5 \
    --junitxml="$home/$name-results.xml" "tests/interop/test_interop_$name.py" || rc=$?
  echo "[$name] tests exited $rc after $(elapsed "$t0") s"
  if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
    status=$rc
  fi
done
exit "$status"
