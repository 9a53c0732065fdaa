#!/usr/bin/env bash
# The GPU checks of benchmarks/GPU_PENDING.md as one script for the device tool (results under $OUT):
#   GPU-marked tests on the compiled Triton kernels, packed-module benchmark, vit calibration on CUDA, kernel table.
# Each step has its own time limit so that one slow step leaves the others their time.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 POLYQUANT_TRITON_NATIVE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== gpu tests"; timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/common/test_packed.py \
    2>&1 | tail -15
echo "== packed benchmark"; timeout 150 python3 benchmarks/packed.py --device cuda --out "$OUT/packed_h100.json" 2>&1 | tail -30
echo "== vit on cuda"; timeout 60 polyquant quantize vit/adalog --device cuda --wbits 4 --abits 4 --calib 32 --quiet \
    --out /tmp/adalog.safetensors --force 2>&1 | tail -3
for m in minmax qhyvit; do echo "== vit/$m on cuda"; timeout 120 polyquant quantize vit/$m --device cuda --wbits 4 \
    --abits 4 --calib 32 --quiet --out /tmp/$m.safetensors --force 2>&1 | tail -3; done
echo "== vit speed"; timeout 400 python3 benchmarks/vit_speed.py --device cuda --out "$OUT/vit_speed_h100.json" 2>&1 | tail -12
echo "== kernels"; timeout "${KERNELS_S:-150}" python3 benchmarks/kernels.py --device cuda --no-sweep \
    --out "$OUT/kernels_h100.json" 2>&1 | tail -40
