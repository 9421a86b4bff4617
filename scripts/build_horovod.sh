#!/usr/bin/env bash
# Build Horovod 0.28.1 for the torch in a virtualenv and install it there (`make horovod`).
#
#   bash scripts/build_horovod.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#
# Horovod's last release pins C++14 in its CMake files, but current torch headers need C++20, so no
# registry wheel or plain `pip install horovod` works. This script:
#   1. does nothing (but re-check the build) when horovod 0.28.1 already imports against this torch;
#   2. otherwise installs a cached wheel from $CACHE/torch-<torch version>/<cpu|nccl>/ if there is one;
#   3. otherwise downloads the sdist, raises the C++ standard 14 -> 20 in the two CMakeLists.txt that
#      pin it (and nothing else), builds a wheel into that cache, and installs it.
# The build tree is kept (under the cache) so an interrupted build resumes where it stopped.
#
# Environment:
#   FLARESWEEP_CACHE       cache root (default ~/.cache/flaresweep); Horovod lives in $CACHE/horovod
#   HOROVOD_BUILD_JOBS     parallel compile jobs (default: number of cores)
#   HOROVOD_BUILD_CUDA_CC_LIST  CUDA archs for Horovod's few kernels (default: the GPUs present,
#                          else 75 = the lowest CUDA 13 supports, as PTX that newer GPUs JIT-compile)
# Exit status: 0 when `import horovod.torch` works afterwards; non-zero with the reason and the
# log path otherwise. Nothing else in the project depends on it (`make test` skips Horovod tests).
set -euo pipefail

HVD_VERSION=0.28.1
PY=${1:-.venv/bin/python}
CACHE=${FLARESWEEP_CACHE:-$HOME/.cache/flaresweep}/horovod
LOG=""

say() { echo "[horovod] $*"; }
die() {
    echo "[horovod] FAILED: $*" >&2
    [[ -n $LOG ]] && echo "[horovod] log: $LOG (last lines below)" >&2 && tail -n 25 "$LOG" >&2
    exit 1
}
# Run a step with its output appended to the log; on failure report the step and the log.
logged() {
    local what=$1
    shift
    echo "=== $what: $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || die "$what"
}

[[ -x $PY ]] || die "no python at '$PY' (run 'make setup' first)"
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
BIN=$(dirname "$PY")

# --- What are we building against? ------------------------------------------------------------
# One python call: torch version, python tag (cp311), CUDA build of torch?, NCCL in torch?, and the
# CUDA runtime / NCCL directories that the torch wheel brings (site-packages/nvidia/...).
probe=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, sys
import torch
import torch.distributed as dist
tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
cudart = nccl = ""
try:
    import nvidia
    for root in nvidia.__path__:
        hits = sorted(glob.glob(os.path.join(root, "cu*", "lib", "libcudart.so.*")))
        hits += sorted(glob.glob(os.path.join(root, "cuda_runtime", "lib", "libcudart.so.*")))
        cudart = cudart or (hits[0] if hits else "")
        inc = os.path.join(root, "nccl", "include", "nccl.h")
        nccl = nccl or (os.path.join(root, "nccl") if os.path.exists(inc) else "")
except ImportError:
    pass
print(torch.__version__, tag, int(torch.version.cuda is not None),
      int(dist.is_available() and dist.is_nccl_available()), cudart or "-", nccl or "-")
EOF
) || die "'$PY' cannot import torch"
probe=$(tail -n 1 <<<"$probe")
read -r TORCH_VERSION PYTAG TORCH_CUDA TORCH_NCCL CUDART_LIB NCCL_HOME <<<"$probe"

# GPU operations over NCCL only where there is a GPU to run them and torch brings NCCL.
GPU_OPS=""
if [[ $TORCH_CUDA == 1 && $TORCH_NCCL == 1 && $NCCL_HOME != - ]] &&
    nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    GPU_OPS=NCCL
fi
VARIANT=$([[ $GPU_OPS == NCCL ]] && echo nccl || echo cpu)
# Horovod's CMake strips the source dir from paths with `string(REGEX REPLACE "${PROJECT_SOURCE_DIR}"`,
# so a regex character in the build path ('+' as in torch 2.15.0+cu132) silently puts the compiled
# extension at a wrong path inside the wheel. Keep the key plain and refuse odd cache paths.
KEY_DIR=$CACHE/torch-${TORCH_VERSION//+/_}/$VARIANT
[[ $KEY_DIR =~ ^[A-Za-z0-9_./-]+$ ]] ||
    die "cache path '$KEY_DIR' has characters Horovod's CMake mishandles; set FLARESWEEP_CACHE to a plain path"
mkdir -p "$KEY_DIR"
LOG=$KEY_DIR/build-$PYTAG.log
say "torch $TORCH_VERSION ($PYTAG), variant $VARIANT; cache $KEY_DIR"

# Does the installed horovod work with this torch (and, on GPU hosts, was it built with NCCL)?
installed_ok() {
    "$PY" - "$HVD_VERSION" "$GPU_OPS" <<'EOF' >/dev/null 2>&1
import sys
import horovod
import horovod.torch as hvd
assert horovod.__version__.split("+")[0] == sys.argv[1], horovod.__version__
assert hvd.gloo_built()
assert sys.argv[2] != "NCCL" or hvd.nccl_built()
EOF
}

check_build() {
    local out
    out=$("$BIN/horovodrun" --check-build 2>&1) || die "horovodrun --check-build failed: $out"
    echo "$out"
    grep -q '\[X\] PyTorch' <<<"$out" || die "horovodrun --check-build: PyTorch not built in"
    grep -q '\[X\] Gloo' <<<"$out" || die "horovodrun --check-build: Gloo not built in"
    if [[ $GPU_OPS == NCCL ]]; then
        grep -q '\[X\] NCCL' <<<"$out" || die "horovodrun --check-build: NCCL not built in"
    fi
}

if installed_ok; then
    say "horovod $HVD_VERSION already installed and importable with torch $TORCH_VERSION"
    check_build
    exit 0
fi

# Only one build per cache at a time (two engineers, or CI beside a developer).
exec 9>"$CACHE/.lock"
flock -n 9 || { say "waiting for another horovod build (lock $CACHE/.lock)"; flock 9; }

# Runtime deps of horovod (+ cffi, which its setup.py asks for at build time), from the registry.
: >"$LOG"
logged "installing horovod's dependencies" \
    "$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging 'cffi>=1.4.0' setuptools wheel

shopt -s nullglob
wheels=("$KEY_DIR"/horovod-"$HVD_VERSION"-"$PYTAG"-*.whl)
shopt -u nullglob

if ((${#wheels[@]} == 0)); then
    # --- Fetch and patch the sdist --------------------------------------------------------------
    SDIST=$CACHE/sdist/horovod-$HVD_VERSION.tar.gz
    if [[ ! -f $SDIST ]]; then
        say "downloading the horovod $HVD_VERSION sdist"
        logged "downloading the sdist" "$PY" -m pip download --quiet --no-deps \
            --no-binary :all: "horovod==$HVD_VERSION" -d "$CACHE/sdist"
        [[ -f $SDIST ]] || die "pip download did not produce $SDIST"
    fi
    WORK=$KEY_DIR/build-$PYTAG
    SRC=$WORK/horovod-$HVD_VERSION
    if [[ ! -f $WORK/.patched ]]; then
        rm -rf "$WORK"
        mkdir -p "$WORK"
        tar -xzf "$SDIST" -C "$WORK" || die "cannot unpack $SDIST"
        # The one source change: C++14 -> C++20 where Horovod pins it (torch's headers need C++20).
        for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
            grep -q '^ *set(CMAKE_CXX_STANDARD 14)' "$SRC/$f" ||
                die "pattern 'set(CMAKE_CXX_STANDARD 14)' not found in $f; sdist changed?"
            sed -i 's/^\( *\)set(CMAKE_CXX_STANDARD 14)/\1set(CMAKE_CXX_STANDARD 20)/' "$SRC/$f"
            if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$SRC/$f" ||
                ! grep -q 'set(CMAKE_CXX_STANDARD 20)' "$SRC/$f"; then
                die "patching $f to C++20 did not apply"
            fi
        done
        touch "$WORK/.patched"
    else
        say "resuming the build in $WORK"
    fi

    # --- Build environment ------------------------------------------------------------------------
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=GLOO
    # setup.py runs make -j8 unless MAKEFLAGS is set; 8 C++20 compiles of torch headers on a small
    # machine run out of memory or time, so follow the core count instead.
    export MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-$(nproc)}"
    # CMake's FindCUDAToolkit wants an unversioned libcudart.so; the torch wheel ships only
    # libcudart.so.13. Link it from a scratch dir rather than writing into site-packages.
    LINKS=$WORK/links
    mkdir -p "$LINKS/lib"
    if [[ $TORCH_CUDA == 1 && $CUDART_LIB != - ]]; then
        CUDA_ROOT=$(dirname "$(dirname "$CUDART_LIB")")
        ln -sfn "$CUDART_LIB" "$LINKS/lib/libcudart.so"
        export CUDAToolkit_ROOT=$CUDA_ROOT
        export CMAKE_LIBRARY_PATH=$LINKS/lib${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}
        export CMAKE_INCLUDE_PATH=$CUDA_ROOT/include${CMAKE_INCLUDE_PATH:+:$CMAKE_INCLUDE_PATH}
    fi
    if [[ $GPU_OPS == NCCL ]]; then
        export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
        export HOROVOD_NCCL_INCLUDE=$NCCL_HOME/include HOROVOD_NCCL_LIB=$LINKS/lib
        shopt -s nullglob
        nccl_libs=("$NCCL_HOME"/lib/libnccl.so.*)
        shopt -u nullglob
        ((${#nccl_libs[@]})) || die "no libnccl.so.* in $NCCL_HOME/lib"
        ln -sfn "${nccl_libs[0]}" "$LINKS/lib/libnccl.so"
        cc_default=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null |
            tr -d . | sort -u | paste -sd,)
    else
        unset HOROVOD_GPU_OPERATIONS
        cc_default=75
    fi
    export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-${cc_default:-75}}

    # --- Build the wheel --------------------------------------------------------------------------
    say "building horovod $HVD_VERSION (C++20, gloo${GPU_OPS:+, $GPU_OPS}, $MAKEFLAGS); takes" \
        "minutes; log: $LOG"
    start=$SECONDS
    rm -rf "$WORK/dist"
    logged "building the horovod wheel" "$PY" -m pip wheel --no-build-isolation --no-deps \
        --verbose -w "$WORK/dist" "$SRC"
    shopt -s nullglob
    built=("$WORK"/dist/horovod-"$HVD_VERSION"-"$PYTAG"-*.whl)
    shopt -u nullglob
    ((${#built[@]} == 1)) || die "pip wheel produced no horovod-$HVD_VERSION-$PYTAG wheel"
    logged "checking the wheel has horovod/torch/mpi_lib_v2*.so" "$PY" -c "
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print(*[n for n in names if n.endswith('.so')], sep=' ')
assert any(n.startswith('horovod/torch/mpi_lib_v2') and n.endswith('.so') for n in names)" "${built[0]}"
    mv "${built[0]}" "$KEY_DIR/"
    wheels=("$KEY_DIR/$(basename "${built[0]}")")
    say "built $(basename "${wheels[0]}") in $((SECONDS - start)) s"
    # The object files are only needed to resume an interrupted build.
    rm -rf "$WORK"
else
    say "using cached wheel $(basename "${wheels[0]}")"
fi

# --- Install and verify -------------------------------------------------------------------------
logged "installing ${wheels[0]}" "$PY" -m pip install --quiet --no-deps --force-reinstall \
    "${wheels[0]}"
if ! installed_ok; then
    "$PY" -c 'import horovod.torch' >>"$LOG" 2>&1 || true
    die "horovod installed but 'import horovod.torch' fails against torch $TORCH_VERSION"
fi
check_build
say "ok: horovod $HVD_VERSION installed into $(dirname "$BIN")"
