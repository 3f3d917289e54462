#!/usr/bin/env bash
# Everything owed on a GPU, in parts, each sized for one command of at most 10 minutes:
#
#   bash benchmarks/gpu_check.sh                  # every part, in this order
#   bash benchmarks/gpu_check.sh kernels          # GPU tests, compute-sanitizer, bench_passes per backend
#   bash benchmarks/gpu_check.sh step-1b          # bench_step: Llama-3.2-1B, bf16 (and NF4 with bitsandbytes)
#   bash benchmarks/gpu_check.sh step-8b-bf16-zo step-8b-bf16-fo step-8b-nf4-zo step-8b-nf4-fo
#   bash benchmarks/gpu_check.sh budget-1b budget-8b
#
# The step parts add their rows to one benchmarks/results/step-<gpu>-<date> file (--merge); the
# budget parts write budget-<gpu>-1b-<date> and budget-<gpu>-8b-nf4-<date>. Results land in
# benchmarks/results/ and, when $OUT is set (a device session), also in $OUT as one tarball per part
# with the logs; they are also kept in /tmp/zopro-gpu-results so that later commands on the same
# machine merge with them. The NF4 parts need bitsandbytes (skipped with a note where it is missing).
# ZOPRO_PART_TIMEOUT (default 570 s) caps each benchmark command.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results=benchmarks/results
stash=/tmp/zopro-gpu-results
logs="${OUT:-$results}"
limit="${ZOPRO_PART_TIMEOUT:-570}"
mkdir -p "$results" "$stash" "$logs"
cp -n "$stash"/* "$results"/ 2>/dev/null || true   # earlier commands' results on this machine
marker="$(mktemp)"

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(kernels step-1b step-8b-bf16-zo step-8b-bf16-fo step-8b-nf4-zo step-8b-nf4-fo
                                 budget-1b budget-8b)

has() { python -c "import $1" 2>/dev/null; }
installed=0
install() {
  [ "$installed" = 1 ] && return
  python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  installed=1
}
nf4() {
  has bitsandbytes && return 0
  echo "[gpu_check] $1: skipped, bitsandbytes is not installed (an NF4 base needs it; README 'Performance')"
  return 1
}
step() {  # bench_step with the issue's sizes: batch 64 × k=4, prompt 512 + 53 new tokens, LoRA r=64
  timeout "$limit" python benchmarks/bench_step.py --merge --profile --warmup 1 --reps 2 --out "$results" "$@" 2>&1 \
    | tee -a "$logs/bench-step.log" | tail -30
}
budget() {
  timeout "$limit" python benchmarks/bench_budget.py --time-limit-s $((limit - 90)) --out "$results" "$@" 2>&1 \
    | tee -a "$logs/bench-budget.log" | tail -30
}

for part in "${parts[@]}"; do
  echo "[gpu_check] === $part ==="
  install
  case "$part" in
    kernels)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$logs/gpu.txt"
      python -m pytest -q tests -m gpu -p no:cacheprovider 2>&1 | tee "$logs/gpu-tests.log" | tail -25
      bash csrc/run_compute_sanitizer.sh 2>&1 | tee "$logs/compute-sanitizer.log" | tail -15
      for backend in triton cuda; do
        python -c "import zopro_kernels as z, torch; assert '$backend' in z.available_backends('cuda', torch.bfloat16)" 2>/dev/null \
          && python benchmarks/bench_passes.py --backend "$backend" --out "$results" 2>&1 | tail -40
      done ;;
    step-1b)
      if has bitsandbytes; then step --arch llama-3.2-1b --base bf16 nf4; else nf4 "$part"; step --arch llama-3.2-1b --base bf16; fi ;;
    step-8b-bf16-zo) step --arch llama-3.1-8b --base bf16 --methods zopro mezo published ;;
    step-8b-bf16-fo) step --arch llama-3.1-8b --base bf16 --methods adamw adamw-ckpt ;;
    step-8b-nf4-zo) nf4 "$part" && step --arch llama-3.1-8b --base nf4 --methods zopro mezo published ;;
    step-8b-nf4-fo) nf4 "$part" && step --arch llama-3.1-8b --base nf4 --methods adamw adamw-ckpt ;;
    budget-1b) budget --arch llama-3.2-1b --base bf16 --tag 1b ;;
    budget-8b) nf4 "$part" && budget --arch llama-3.1-8b --base nf4 --tag 8b-nf4 ;;
    *) echo "[gpu_check] unknown part '$part'"; exit 2 ;;
  esac
  new=$(cd "$results" && find . -maxdepth 1 -type f -newer "$marker" -printf '%P\n')
  if [ -n "$new" ]; then
    (cd "$results" && cp $new "$stash"/)
    [ -n "${OUT:-}" ] && (cd "$results" && tar czf "$OUT/results-$part.tgz" $new)
  fi
done
rm -f "$marker"
