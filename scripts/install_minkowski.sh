#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 from its PyPI source for the torch of the active Python environment,
# and install it there. The built wheel is cached (FCMAE_WHEEL_CACHE, default
# ~/.cache/fcmae/wheels), so a second install takes seconds.
#
#   . .venv/bin/activate && bash scripts/install_minkowski.sh          # CPU, or CUDA when a GPU is visible
#   . .venv/bin/activate && bash scripts/install_minkowski.sh --cuda   # CUDA, no GPU needed to build
#   . .venv/bin/activate && bash scripts/install_minkowski.sh --cpu    # CPU even beside a GPU
#   . .venv/bin/activate && bash scripts/install_minkowski.sh --cuda --fork  # the official code's fork
#
# FCMAE_MINKOWSKI_FLAVOUR=cpu|cuda|auto does the same as the flags (auto, the default, builds the
# CUDA flavour only when torch sees a GPU). FCMAE_MINKOWSKI_BUILD_DIR=DIR keeps the build folder in
# DIR instead of a temporary one, so that running the script again after an interruption continues
# the build where it stopped (worth it for the CUDA flavour's long build).
#
# --fork builds, instead of the PyPI release, the fork the official ConvNeXt V2 code pins
# (github.com/shwoo93/MinkowskiEngine at commit bbc30ef, upstream's master of January 2022 plus
# MinkowskiDepthwiseConvolution, a fused depthwise kernel for CUDA only); the minkowski backend
# uses that kernel on CUDA when it is there. Where the download cannot be reached (PyPI's
# files.pythonhosted.org, or GitHub for --fork), point FCMAE_MINKOWSKI_TARBALL at the source .tar.gz.
#
# The CUDA flavour needs a CUDA build of torch (torch.version.cuda set) and no GPU. It compiles
# for TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX" (A100, H100/H200, plus sm_90 PTX that newer GPUs
# can JIT-compile); the wheel it makes is tied to this torch, CUDA and Python version. Its CUDA
# toolkit is a system one of torch's CUDA major.minor when that toolkit is complete (nvcc,
# cuSPARSE, cuBLAS and thrust headers, libcusparse); otherwise nvcc and the CCCL headers come from
# PyPI (nvidia-cuda-nvcc and friends, pinned to torch's CUDA major.minor) and the rest from the
# CUDA libraries torch's wheels installed.
#
# Facts this script works around (measured with Python 3.11 and 3.12, torch 2.14.1 and 2.11.0):
# without --blas the 0.5.4 setup.py looks for BLAS with numpy.distutils, gone from numpy 2 and
# Python 3.12, so the sources are downloaded directly (not with pip, which would run setup.py)
# and built with --blas=openblas, which needs the OpenBLAS headers; the build runs in a separate
# build environment holding the same torch version; the CUDA sources need the patches in
# patch_cuda_sources below (CUDA 13, CCCL 3, C++20).
set -euo pipefail

REQUEST=${FCMAE_MINKOWSKI_FLAVOUR:-auto}
FORK=0
FORK_COMMIT=bbc30ef581ea6deb505976b663f5fc2358a83749
FORK_URL=https://codeload.github.com/shwoo93/MinkowskiEngine/tar.gz/$FORK_COMMIT
PYPI_URL=https://files.pythonhosted.org/packages/21/5c/c543c4bc5fbe73ac3e38465b3da4f24a61f7a4ac5baec867e582e94aa551/MinkowskiEngine-0.5.4.tar.gz
PYPI_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
for arg in "$@"; do
    case $arg in
        --cuda) REQUEST=cuda ;;
        --cpu) REQUEST=cpu ;;
        --fork) FORK=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (use --cuda, --cpu or --fork)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-python}
START_DIR=$(pwd)
CACHE=${FCMAE_WHEEL_CACHE:-$HOME/.cache/fcmae/wheels}
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
TORCH_SPEC=$("$PYTHON" -c "import torch; print(torch.__version__)")
TORCH_CUDA=$("$PYTHON" -c "import torch; print(torch.version.cuda or '')")
PYTAG=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
case $REQUEST in
    cpu) FLAVOUR=cpu ;;
    cuda)
        if [ -z "$TORCH_CUDA" ]; then
            echo "the CUDA flavour needs a CUDA build of torch; torch $TORCH_SPEC has none" >&2
            exit 1
        fi
        FLAVOUR=cuda ;;
    auto)
        if [ -n "$TORCH_CUDA" ] && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
            FLAVOUR=cuda
        else
            FLAVOUR=cpu
        fi ;;
    *) echo "FCMAE_MINKOWSKI_FLAVOUR must be cpu, cuda or auto, not '$REQUEST'" >&2; exit 2 ;;
esac
if [ "$FORK" = 1 ] && [ "$FLAVOUR" = cpu ]; then
    echo "the fork's depthwise kernel exists for CUDA only: build it with --cuda --fork" >&2
    exit 2
fi
VARIANT=$([ "$FORK" = 1 ] && echo "fork-${FORK_COMMIT:0:7}" || echo "0.5.4")
if [ "$FLAVOUR" = cpu ]; then
    WHEEL_DIR="$CACHE/minkowskiengine-0.5.4-torch$TORCH_VERSION-$PYTAG-cpu"
else
    CUDA_ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
    # "8.0;9.0+PTX" -> "sm80-sm90+ptx": the architectures are part of the cache folder name
    ARCH_TAG=$(echo "$CUDA_ARCHS" | tr ' ;' '\n\n' | sed -e '/^$/d' -e 's/\.//' -e 's/+PTX$/+ptx/' -e 's/^/sm/' | paste -sd- -)
    WHEEL_DIR="$CACHE/minkowskiengine-$VARIANT-torch$TORCH_VERSION-$PYTAG-cuda$TORCH_CUDA-$ARCH_TAG"
fi

# edit FILE PERL-SUBSTITUTION: apply one source patch in place, and stop if it changed nothing
# (a patch that no longer matches must be noticed, not skipped)
edit() {
    local file=$1 expr=$2
    cp "$file" "$file.orig"
    perl -0pi -e "$expr" "$file"
    if cmp -s "$file" "$file.orig"; then
        echo "source patch did not apply to $file: $expr" >&2
        exit 1
    fi
    rm "$file.orig"
}

# The 0.5.4 CUDA sources predate CUDA 12/13, CCCL 3 and torch's C++20; run in the source folder.
patch_cuda_sources() {
    # CUDA 13 moved the thrust/cub headers to include/cccl, which nvcc searches but g++ (for the
    # .cpp files of the CUDA build, which include thrust) does not: add it to the include path
    edit setup.py 's/(include_dirs=\[str\(SRC_PATH\), str\(SRC_PATH \/ "3rdparty"\),)/$1 *([os.path.join(os.environ["CUDA_HOME"], "include", "cccl")] if os.path.isdir(os.path.join(os.environ.get("CUDA_HOME", ""), "include", "cccl")) else []),/'
    # CCCL 3 removed thrust::unary_function; the functor only used it for typedefs nobody reads
    edit src/coordinate_map_functors.cuh 's/\s*:\s*public\s+thrust::unary_function<[^{]*?>\s*\{/ {/'
    # thrust no longer includes these headers transitively (CUDA >= 12): include what is used
    edit src/3rdparty/concurrent_unordered_map.cuh 's/(#include <thrust\/count.h>\n)/$1#include <thrust\/execution_policy.h>\n/'
    edit src/coordinate_map_gpu.cu 's/(#include <thrust\/sort.h>\n)/$1#include <thrust\/remove.h>\n#include <thrust\/unique.h>\n/'
    edit src/spmm.cu 's/(#include <cusparse.h>\n)/$1#include <thrust\/execution_policy.h>\n#include <thrust\/reduce.h>\n#include <thrust\/sort.h>\n/'
    # torch 2.14's ATen/cuda/CUDAUtils.h uses at::Tensor without including its definition
    edit src/spmm.cu 's/(#include <ATen\/cuda\/CUDAContext.h>\n)/#include <ATen\/core\/Tensor.h>\n$1/'
    # the vendored pre-release NVTX3 C++ header clashes with the toolkit's nvtx3 namespace; its one
    # use is a profiler annotation in the hash map's constructor, so drop it
    edit src/3rdparty/concurrent_unordered_map.cuh 's/#include <cudf\/detail\/nvtx\/ranges.hpp>\n//; s/[ \t]*CUDF_FUNC_RANGE\(\);\n//'
    # CUDA 13 changed cudaMemPrefetchAsync(ptr, size, device, stream) to take a cudaMemLocation
    # and flags (both calls in the hash map); keep the old call for older CUDA
    edit src/3rdparty/concurrent_unordered_map.cuh 's/\n([ \t]*)CUDA_TRY\(\s*cudaMemPrefetchAsync\((m_hashtbl_values, m_capacity \* sizeof\(value_type\)), dev_id, stream\)\);/\n#if CUDART_VERSION >= 13000\n$1cudaMemLocation location{};\n$1location.type = cudaMemLocationTypeDevice;\n$1location.id = dev_id;\n$1CUDA_TRY(cudaMemPrefetchAsync($2, location, 0, stream));\n#else\n$1CUDA_TRY(cudaMemPrefetchAsync($2, dev_id, stream));\n#endif/g'
    # the map's element type is cuda::std::pair (thrust::pair in CCCL 3), so converting the
    # unique_ptr that create() returns into the std::shared_ptr the coordinate map keeps makes
    # libstdc++'s unqualified __to_address call ambiguous with libcu++'s (found by argument-
    # dependent lookup): let create() return the shared_ptr directly, same deleter
    edit src/3rdparty/concurrent_unordered_map.cuh 's/return std::unique_ptr<Self, std::function<void\(Self\*\)>>\{/return std::shared_ptr<Self>{/'
}

# Print the path of a CUDA toolkit for the build, of torch's CUDA major.minor: a complete system one
# if there is one, else one assembled in $1 from PyPI's nvcc/CCCL wheels (installed with pip $2)
# and the CUDA libraries and headers torch's wheels put in the build environment ($3: site-packages).
cuda_toolkit() {
    local dest=$1 pip=$2 site=$3 home candidates=()
    if [ -x "$dest/bin/nvcc" ]; then  # assembled by an earlier, interrupted run in the same build folder
        echo "$dest"
        return
    fi
    [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
    [ -n "${CUDA_PATH:-}" ] && candidates+=("$CUDA_PATH")
    if command -v nvcc >/dev/null 2>&1; then
        candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
    fi
    candidates+=(/usr/local/cuda "/usr/local/cuda-$TORCH_CUDA")
    for home in "${candidates[@]}"; do
        if [ -x "$home/bin/nvcc" ] && [ -e "$home/include/cusparse.h" ] && [ -e "$home/include/cublas_v2.h" ] \
            && { [ -e "$home/include/thrust/version.h" ] || [ -e "$home/include/cccl/thrust/version.h" ]; } \
            && { [ -e "$home/lib64/libcusparse.so" ] || [ -e "$home/lib/libcusparse.so" ]; } \
            && grep -q "release $TORCH_CUDA," <<<"$("$home/bin/nvcc" --version)"; then
            echo "using the CUDA $TORCH_CUDA toolkit in $home" >&2
            echo "$home"
            return
        fi
    done
    local major=${TORCH_CUDA%%.*} wheels="$site/nvidia/cu${TORCH_CUDA%%.*}"
    if [ "$major" -lt 13 ] || [ ! -d "$wheels/include" ]; then
        echo "no complete CUDA $TORCH_CUDA toolkit found (nvcc, cuSPARSE/cuBLAS/thrust headers, libcusparse)," >&2
        echo "and only torch's CUDA >= 13 wheels can stand in for one: install CUDA $TORCH_CUDA and set CUDA_HOME" >&2
        exit 1
    fi
    echo "no complete CUDA $TORCH_CUDA toolkit on this system: assembling one from PyPI wheels" >&2
    # the nvcc wheel asks for crt and nvvm unpinned: pin all four to torch's CUDA major.minor
    "$pip" install -q --no-deps "nvidia-cuda-nvcc==$TORCH_CUDA.*" "nvidia-cuda-crt==$TORCH_CUDA.*" \
        "nvidia-nvvm==$TORCH_CUDA.*" "nvidia-cuda-cccl==$TORCH_CUDA.*" >&2
    mkdir -p "$dest/bin" "$dest/lib64" "$dest/targets/x86_64-linux"
    # nvcc finds its profile, cicc and headers relative to its own real path: copy it, link the rest
    local f base
    for f in "$wheels"/bin/*; do
        case $(basename "$f") in
            nvcc | nvcc.profile) cp "$f" "$dest/bin/" ;;
            *) ln -s "$f" "$dest/bin/" ;;
        esac
    done
    ln -s "$wheels/nvvm" "$dest/nvvm"
    ln -s "$wheels/include" "$dest/include"
    # the linker wants unversioned names (libcudart.so, libcusparse.so); the wheels ship libX.so.N
    for f in "$wheels"/lib/*; do ln -s "$f" "$dest/lib64/"; done
    for f in "$wheels"/lib/lib*.so.*; do
        base=$(basename "$f")
        [ -e "$dest/lib64/${base%%.so.*}.so" ] || ln -s "$base" "$dest/lib64/${base%%.so.*}.so"
    done
    ln -s lib64 "$dest/lib"
    ln -s ../../include "$dest/targets/x86_64-linux/include"
    ln -s ../../lib64 "$dest/targets/x86_64-linux/lib"
    "$dest/bin/nvcc" --version | tail -2 >&2
    echo "$dest"
}

# the wheel's name is MinkowskiEngine-... or minkowskiengine-..., as the setuptools version spells it
if ! ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    NAME=$([ "$FORK" = 1 ] && echo "the ConvNeXt V2 fork of MinkowskiEngine (${FORK_COMMIT:0:7})" || echo "MinkowskiEngine 0.5.4")
    if [ "$FLAVOUR" = cpu ]; then
        echo "building $NAME (cpu) for torch $TORCH_SPEC; this takes about 10 minutes on 2 cores"
    else
        echo "building $NAME (cuda $TORCH_CUDA, TORCH_CUDA_ARCH_LIST=$CUDA_ARCHS) for torch $TORCH_SPEC; on 2 cores this took 21 minutes for sm_90 alone, 24 for 8.0;9.0+PTX"
    fi
    if [ ! -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] \
        && [ ! -e /usr/include/openblas/cblas.h ] && [ ! -e /usr/include/cblas.h ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq libopenblas-dev >/dev/null
        else
            echo "MinkowskiEngine needs the OpenBLAS headers: sudo apt-get install libopenblas-dev" >&2
            exit 1
        fi
    fi
    if [ -n "${FCMAE_MINKOWSKI_BUILD_DIR:-}" ]; then
        mkdir -p "$FCMAE_MINKOWSKI_BUILD_DIR"
        WORK=$(cd "$FCMAE_MINKOWSKI_BUILD_DIR" && pwd)/$FLAVOUR-$VARIANT
        echo "build folder (kept; run again to continue an interrupted build): $WORK"
    else
        WORK=$(mktemp -d)
        trap 'rm -rf "$WORK"' EXIT
    fi
    [ -x "$WORK/build-env/bin/python" ] || "$PYTHON" -m venv "$WORK/build-env"
    "$WORK/build-env/bin/pip" install -q numpy setuptools wheel "torch==$TORCH_VERSION"
    SOURCE=$WORK/src/MinkowskiEngine
    if [ ! -e "$SOURCE/.fcmae-prepared" ]; then
        rm -rf "$WORK/src" "$WORK/download" "$WORK/extract"
        mkdir -p "$WORK/src" "$WORK/download" "$WORK/extract"
        if [ -n "${FCMAE_MINKOWSKI_TARBALL:-}" ]; then
            cp "$FCMAE_MINKOWSKI_TARBALL" "$WORK/download/source.tar.gz"
        elif [ "$FORK" = 1 ]; then
            "$PYTHON" -c "import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])" "$FORK_URL" \
                "$WORK/download/source.tar.gz"
        else
            "$PYTHON" -c "import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])" "$PYPI_URL" \
                "$WORK/download/source.tar.gz"
        fi
        if [ "$FORK" = 0 ] && ! echo "$PYPI_SHA256  $WORK/download/source.tar.gz" | sha256sum -c --quiet -; then
            echo "the MinkowskiEngine source archive is not PyPI's 0.5.4 sdist (sha256 differs)" >&2
            exit 1
        fi
        tar -xzf "$WORK/download/source.tar.gz" -C "$WORK/extract"
        mv "$WORK"/extract/* "$SOURCE"  # the one top-level folder, whatever the archive called it
        cd "$SOURCE"
        # setup.py deletes build/ (the compiled objects) whenever it starts: keep them, so that a
        # build interrupted in FCMAE_MINKOWSKI_BUILD_DIR continues where it stopped
        edit setup.py 's/^run_command\("rm", "-rf", "build"\)\n//m'
        if [ "$FLAVOUR" = cuda ]; then
            patch_cuda_sources
        fi
        touch .fcmae-prepared
    fi
    cd "$SOURCE"
    BUILD_ARGS=(--blas=openblas)
    if [ "$FLAVOUR" = cpu ]; then
        BUILD_ARGS+=(--cpu_only)
    else
        SITE=$("$WORK/build-env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        export CUDA_HOME
        CUDA_HOME=$(cuda_toolkit "$WORK/cuda" "$WORK/build-env/bin/pip" "$SITE")
        export TORCH_CUDA_ARCH_LIST=$CUDA_ARCHS
        # setup.py builds CPU-only when torch sees no GPU unless forced
        BUILD_ARGS+=(--force_cuda)
    fi
    # setup.py runs "pip uninstall MinkowskiEngine": let that be the build environment's pip
    PATH="$WORK/build-env/bin:$PATH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$WORK/build-env/bin/python" setup.py -q bdist_wheel "${BUILD_ARGS[@]}" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; echo "MinkowskiEngine build failed (log above)" >&2; exit 1; }
    mkdir -p "$WHEEL_DIR"
    cp dist/*.whl "$WHEEL_DIR/"
    cd "$START_DIR"  # not the source folder: the check below must import the installed package
fi
# --no-deps: the wheel asks for an unpinned torch, which must stay the one it was built for
"$PYTHON" -c "import numpy" 2>/dev/null || "$PYTHON" -m pip install -q numpy
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/*.whl
"$PYTHON" - "$FLAVOUR" <<'CHECK'
import collections, collections.abc, sys
collections.Sequence = collections.abc.Sequence  # 0.5.4 still imports it from collections
import MinkowskiEngine as ME
cuda = ME.is_cuda_available()
if sys.argv[1] == "cuda" and not cuda:
    sys.exit("the MinkowskiEngine just installed has no CUDA support; remove its cached wheel and build again")
print(f"MinkowskiEngine {ME.__version__} installed ({'CUDA' if cuda else 'CPU-only'} build)")
CHECK
