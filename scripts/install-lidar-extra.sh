#!/usr/bin/env bash
# The lidar plugin's optional mmdet3d extra: mmcv 2.1.0 built from source with its CPU ops, then mmengine 0.10.7,
# mmdet 3.3.0 and mmdet3d 1.4.0, into the project's venv (run `make venv` first). About 15 minutes on 2 cores.
#
#   scripts/install-lidar-extra.sh            # PY=.venv/bin/python by default
#   MMCV_WHEEL_DIR=/some/cache scripts/install-lidar-extra.sh   # keep the built mmcv wheel there and reuse it
#
# What it works around (../shared/specs/deps.md section 7):
# - mmcv's setup.py imports pkg_resources: setuptools 81+ dropped it, so setuptools<81 is installed and the build
#   runs without isolation (it also needs the venv's torch);
# - torch 2.14's ATen headers need C++20 and mmcv 2.1.0 compiles with -std=c++17: the flag is raised in the
#   unpacked sdist before building;
# - mmdet3d's pinned requirements would downgrade numpy (nuscenes-devkit), so the OpenMMLab packages go in with
#   --no-deps and their runtime needs are listed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY has no torch; run 'make venv' first" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
WHEELS=${MMCV_WHEEL_DIR:-$WORK/wheels}
mkdir -p "$WHEELS"

"$PY" -m pip install --quiet "setuptools>=77,<81" wheel ninja
if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation "mmcv==2.1.0" -d "$WORK"
    tar -xzf "$WORK"/mmcv-2.1.0.tar.gz -C "$WORK"
    if "$PY" -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 14))"; then
        sed -i 's/-std=c++17/-std=c++20/g; s/-std=c++14/-std=c++20/g' "$WORK"/mmcv-2.1.0/setup.py
    fi
    echo "building mmcv 2.1.0 with its CPU ops (about 15 minutes on 2 cores)..."
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
        "$WORK"/mmcv-2.1.0 -w "$WHEELS"
fi
"$PY" -m pip install --quiet --no-deps "$WHEELS"/mmcv-2.1.0-*.whl
"$PY" -m pip install --quiet --no-deps "mmengine==0.10.7" "mmdet==3.3.0" "mmdet3d==1.4.0"
"$PY" -m pip install --quiet addict yapf termcolor rich six "opencv-python-headless>=4" shapely terminaltables \
    pycocotools "numba>=0.57" plyfile trimesh
"$PY" -c "import mmcv._ext, mmdet3d.models; print('mmdet3d', __import__('mmdet3d').__version__, 'with mmcv ops: ok')"
