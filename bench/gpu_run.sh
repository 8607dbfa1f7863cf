#!/usr/bin/env bash
# The whole GPU session in one command (for a lent GPU machine with torch + triton preinstalled and
# no network): make vse_fast importable without pip, run the one-shot GPU check, then the CUDA tests.
#   bash bench/gpu_run.sh [OUTDIR]      (OUTDIR defaults to bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# kernels/ importable as vse_fast.kernels, as setup.py's package_dir does (this is a throwaway copy).
[ -e vse_fast/kernels ] || ln -s ../kernels vse_fast/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu_env.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu_env.txt"

# The one-shot check first: its JSON (correctness + timings + memory) is what a short lease must bring back.
# It is written after every section; "compile" (BERT-base under torch.compile, compile time unknown
# until measured) runs last, so a cut-off run loses only that section.
# The two timeouts add up to 590 s, under the lent machine's 600 s per command.
timeout ${CHECK_TIMEOUT:-420} python bench/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
echo "gpu_check exit: ${PIPESTATUS[0]}"

# CUDA tests (the interpreter tests skip themselves when a GPU is present): the quick files first, the
# GPO pool file (hundreds of cases, one build per shape specialization) last.
timeout ${TEST_TIMEOUT:-170} python -m pytest -q -p no:cacheprovider tests/test_gpo_table.py tests/test_contrastive.py \
  tests/test_gpo_module.py tests/test_gpo_pool.py -k "cuda or sync" 2>&1 | tee "$out/gpu_tests.log" | tail -n 40
echo "cuda tests exit: ${PIPESTATUS[0]}"
