#!/usr/bin/env bash
# compute-sanitizer over the CUDA backend's GPU tests (run on a GPU machine, from the repo root).
#
#   csrc/run_compute_sanitizer.sh                 # memcheck, racecheck, initcheck, synccheck
#   TOOLS="memcheck" csrc/run_compute_sanitizer.sh -k perturb
#
# Uses the installed library, or $ZOPRO_CSRC_LIBRARY (e.g. build/libzopro_csrc.so). Extra
# arguments go to pytest. Triton's kernels are excluded (-k "not triton"): only csrc/'s kernels
# are under test; a clean run prints "ERROR SUMMARY: 0 errors" for every tool.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitizer="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
tools="${TOOLS:-memcheck racecheck initcheck synccheck}"
status=0
for tool in $tools; do
  echo "== compute-sanitizer --tool $tool"
  # --target-processes all: pytest may spawn helpers; --error-exitcode makes failures visible.
  "$sanitizer" --tool "$tool" --error-exitcode 97 --target-processes all \
    python -m pytest -q -x -m gpu tests/test_cuda_backend.py -k "not triton" "$@" || status=$?
done
exit $status
