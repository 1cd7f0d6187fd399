#!/usr/bin/env bash
# Build MinkowskiEngine 0.5.4 from its PyPI source for the torch of the active Python environment,
# and install it there. CPU-only unless nvcc and a GPU are present. The built wheel is cached
# (FCMAE_WHEEL_CACHE, default ~/.cache/fcmae/wheels), so a second install takes seconds.
#
#   . .venv/bin/activate && bash scripts/install_minkowski.sh
#
# Facts this script works around (measured on Python 3.11, torch 2.14.1): the 0.5.4 setup.py
# needs numpy.distutils (numpy < 2) and setuptools < 60, so it builds in a separate build
# environment holding the same torch version; the CPU build needs the OpenBLAS headers.
set -euo pipefail

PYTHON=${PYTHON:-python}
CACHE=${FCMAE_WHEEL_CACHE:-$HOME/.cache/fcmae/wheels}
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
TORCH_SPEC=$("$PYTHON" -c "import torch; print(torch.__version__)")
PYTAG=$("$PYTHON" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
if command -v nvcc >/dev/null 2>&1 && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    FLAVOUR=cuda
else
    FLAVOUR=cpu
fi
WHEEL_DIR="$CACHE/minkowskiengine-0.5.4-torch$TORCH_VERSION-$PYTAG-$FLAVOUR"

if ! ls "$WHEEL_DIR"/MinkowskiEngine-*.whl >/dev/null 2>&1; then
    echo "building MinkowskiEngine 0.5.4 ($FLAVOUR) for torch $TORCH_SPEC; this takes about 10 minutes on 2 cores"
    if [ "$FLAVOUR" = cpu ] && [ ! -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] \
        && [ ! -e /usr/include/openblas/cblas.h ] && [ ! -e /usr/include/cblas.h ]; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && apt-get install -y -qq libopenblas-dev >/dev/null
        else
            echo "MinkowskiEngine needs the OpenBLAS headers: sudo apt-get install libopenblas-dev" >&2
            exit 1
        fi
    fi
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m venv "$WORK/build-env"
    "$WORK/build-env/bin/pip" install -q "numpy<2" wheel "torch==$TORCH_VERSION"
    # torch asks for a newer setuptools than the one setup.py can use: pin it afterwards
    "$WORK/build-env/bin/pip" install -q --no-deps "setuptools<60"
    "$WORK/build-env/bin/pip" download -q --no-deps --no-binary :all: MinkowskiEngine==0.5.4 -d "$WORK/src"
    tar -xzf "$WORK"/src/MinkowskiEngine-0.5.4.tar.gz -C "$WORK/src"
    cd "$WORK/src/MinkowskiEngine-0.5.4"
    BUILD_ARGS=(--blas=openblas)
    [ "$FLAVOUR" = cpu ] && BUILD_ARGS+=(--cpu_only)
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$WORK/build-env/bin/python" setup.py -q bdist_wheel "${BUILD_ARGS[@]}" >"$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log" >&2; echo "MinkowskiEngine build failed (log above)" >&2; exit 1; }
    mkdir -p "$WHEEL_DIR"
    cp dist/MinkowskiEngine-*.whl "$WHEEL_DIR/"
    cd - >/dev/null
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/MinkowskiEngine-*.whl
"$PYTHON" -c "import fcmae.models.backends.minkowski as m; m.import_minkowski(); print('MinkowskiEngine installed')" 2>/dev/null \
    || "$PYTHON" -c "import collections, collections.abc; collections.Sequence = collections.abc.Sequence; import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'installed')"
