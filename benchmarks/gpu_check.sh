#!/usr/bin/env bash
# Everything owed on a GPU, in one go (for a device session): the GPU tests, then the pass
# benchmark for each GPU backend. Results land in benchmarks/results/ and, when $OUT is set, in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -m pytest -q tests -m gpu -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -25
bash csrc/run_compute_sanitizer.sh 2>&1 | tee "$out/compute-sanitizer.log" | tail -15
for backend in triton cuda; do
  python -c "import zopro_kernels as z, torch; assert '$backend' in z.available_backends('cuda', torch.bfloat16)" 2>/dev/null \
    && python benchmarks/bench_passes.py --backend "$backend" --out "$out" 2>&1 | tail -40
done
