#!/usr/bin/env bash
# Creates or updates the environment for `--backend ipex`: torch 2.8 + intel-extension-for-pytorch
# 2.8.0 (IPEX 2.8 refuses any other torch, so it cannot share the main .venv's torch 2.13).
#
# It lives OUTSIDE the clone, in ${CPUGEN_IPEX_ENV:-$HOME/.cache/cpugen/ipex-venv}, and is reused:
# a stamp file records what was installed, and a rerun with the same pins downloads nothing (it
# only re-points the editable cpugen install at this clone and re-checks the imports).
#
#   bash scripts/ipex_env.sh                    # create / update, then verify
#   "$HOME/.cache/cpugen/ipex-venv/bin/python" -m pytest -q -m ipex
#   "$HOME/.cache/cpugen/ipex-venv/bin/python" -m cpugen run --backend ipex ...
#
# PyPI serves only the CUDA build of torch 2.8.0 (about 7 GB with its nvidia-* dependencies, which
# it needs even on a CPU: `import torch` preloads libcudart/libcublas, so `--no-deps` fails).
# Environment: CPUGEN_IPEX_ENV (where), CPUGEN_IPEX_PYTHON (the python that makes the venv, default
# python3), CPUGEN_WHEEL_CACHE (a folder of wheels pip may take from first, default
# $HOME/.cache/cpugen/wheels when it exists).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${CPUGEN_IPEX_ENV:-$HOME/.cache/cpugen/ipex-venv}"
BASE_PY="${CPUGEN_IPEX_PYTHON:-python3}"
WHEELS="${CPUGEN_WHEEL_CACHE:-$HOME/.cache/cpugen/wheels}"

TORCH=2.8.0
IPEX=2.8.0
TRANSFORMERS=4.51.3
PKGS=("torch==$TORCH" "intel-extension-for-pytorch==$IPEX" "transformers==$TRANSFORMERS"
      numpy psutil safetensors tokenizers ninja pytest "setuptools>=64" wheel)  # ninja: builds kernels/
STAMP="$ENV_DIR/.cpugen-ipex-stamp"
PY="$ENV_DIR/bin/python"

say() { echo "ipex_env: $*"; }
die() { echo "ipex_env: error: $*" >&2; exit 1; }

command -v "$BASE_PY" >/dev/null || die "$BASE_PY not found (set CPUGEN_IPEX_PYTHON)"
mkdir -p "$(dirname "$ENV_DIR")"
# one writer at a time (a CI run and a developer may share the cache)
exec 9>"$ENV_DIR.lock"
flock 9

base_version="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
want="python=$base_version ${PKGS[*]}"

# --- the venv ------------------------------------------------------------------------------------
if [[ -x "$PY" ]] && "$PY" -c 'import sys' 2>/dev/null \
   && [[ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == "$base_version" ]]; then
  say "reusing $ENV_DIR"
else
  say "creating $ENV_DIR with $BASE_PY ($base_version)"
  "$BASE_PY" -m venv --clear "$ENV_DIR"
  rm -f "$STAMP"
fi

pip_install() {
  local extra=()
  [[ -d "$WHEELS" ]] && extra+=(--find-links "$WHEELS")
  "$PY" -m pip install --disable-pip-version-check --progress-bar off "${extra[@]}" "$@"
}

# --- third-party packages (skipped when the stamp matches) ---------------------------------------
install_deps() {
  say "installing ${PKGS[*]} (torch $TORCH from PyPI is the CUDA build: several GB the first time)"
  pip_install "${PKGS[@]}"
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  say "packages up to date (stamp $STAMP)"
else
  install_deps
fi

# --- cpugen itself: editable, pointing at this clone ---------------------------------------------
# The env is shared by clones; each run re-points it at the clone it was run from (no download:
# --no-deps, and setuptools + wheel are in the env already for --no-build-isolation).
installed_at="$(cd / && "$PY" -c 'import cpugen, os; print(os.path.dirname(os.path.dirname(os.path.realpath(cpugen.__file__))))' 2>/dev/null || true)"
if [[ "$installed_at" == "$REPO" ]]; then
  say "cpugen already installed from $REPO"
else
  say "installing cpugen from $REPO (editable, --no-deps)"
  pip_install --quiet --no-deps --no-build-isolation -e "$REPO"
fi

# --- verify ----------------------------------------------------------------------------------------
verify() {
  # from / so that the import is the installed cpugen, not the current directory's
  (cd / && "$PY" - "$TORCH" "$IPEX" "$TRANSFORMERS" "$REPO" <<'EOF'
import os, sys
torch_v, ipex_v, tf_v, repo = sys.argv[1:]
import torch, transformers, safetensors, tokenizers, numpy, psutil, pytest  # noqa: F401
import cpugen
from cpugen.runtime import backends
from cpugen.runtime import ipex as ipex_backend
ipex, why = ipex_backend.import_ipex()  # quiet: IPEX's import prints kernel-override notices
problems = []
if ipex is None:
    problems.append(f"intel_extension_for_pytorch does not import: {why}")
elif not ipex.__version__.startswith(ipex_v):
    problems.append(f"intel_extension_for_pytorch {ipex.__version__}, want {ipex_v}")
if not torch.__version__.startswith(torch_v):
    problems.append(f"torch {torch.__version__}, want {torch_v}")
if transformers.__version__ != tf_v:
    problems.append(f"transformers {transformers.__version__}, want {tf_v}")
where = os.path.dirname(os.path.dirname(os.path.realpath(cpugen.__file__)))
if where != repo:
    problems.append(f"cpugen imports from {where}, not {repo}")
if not problems and backends.resolve("ipex") != "ipex":
    problems.append("cpugen.runtime.backends.resolve('ipex') does not choose ipex")
if problems:
    sys.exit("; ".join(problems))
print(f"torch {torch.__version__}, intel_extension_for_pytorch {ipex.__version__}, "
      f"transformers {transformers.__version__}, cpugen from {where}")
EOF
  )
}
if out="$(verify 2>&1)"; then
  :
elif [[ -f "$STAMP" ]]; then
  # the stamp said up to date but the env disagrees (changed by hand?): install once more
  say "verification failed with a current stamp ($(tail -n 1 <<<"$out")); reinstalling"
  rm -f "$STAMP"
  install_deps
  out="$(verify 2>&1)" || die "verification failed: $out"
else
  die "verification failed: $out"
fi
echo "$want" >"$STAMP"
say "ok: $(tail -n 1 <<<"$out")"
say "python: $PY"
