#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests, then bench_models on the device
# (GPU sizes, memory, the anchors where their wheels are carried in .whl/), then the Monitor
# rows under bf16 autocast. Writes logs to $OUT (or ./gpu-out) as it goes.
#     bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/anchors .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/anchors
fi
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/machine.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_cuda.py 2>&1 | tee "$out/tests.txt" | tail -30
timeout 170 python3 -m benchmarks.bench_models --device cuda --size gpu --budget 0.7 --anchors 2>&1 | tee "$out/bench_models_cuda.md"
timeout 60 python3 -m benchmarks.bench_models --device cuda --size gpu --budget 0.3 --autocast --no-memory 2>&1 \
    | grep -E "^#|^\|---|^\| model|autocast" | tee "$out/bench_models_cuda_autocast.md"
