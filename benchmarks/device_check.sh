#!/usr/bin/env bash
# Every GPU row of benchmarks/README.md in one call, most important first, each written into OUT
# as soon as it is measured (a call cut short still returns what it finished):
#
#   1. flops     the X (and Y) pass in bf16 against the measured bf16 matmul peak (≥ 32k tokens)
#   2. decoding  tokens/s of batched decoding against the bandwidth bound, growing batches
#   3. sampler   the sampler's share of a decoding step at V = 151,936
#   4. fresh     fresh rollouts by verification against full regeneration, per η
#   5. cuda      the test suite's CUDA tests
#   6. e2e       the whole probe at the Qwen2.5-1.5B shape with LoRA, per-stage table (needs snakemake)
#
#   bash benchmarks/device_check.sh OUT             # on the GPU machine (about 8 minutes on an H100)
#   bash benchmarks/device_check.sh --dry-run OUT   # CPU, smoke sizes, seconds: checks the script itself
#
# OUT gets one JSON file and one log per step, and status.tsv (step, exit code, seconds). Packages
# the GPU machine lacks (snakemake and its dependencies) are installed from benchmarks/wheels/
# (git-ignored; fill it with `pip download -d benchmarks/wheels snakemake==9.* jsonschema ...`,
# at most 64 MiB) when that folder exists. Per-step time limits: DEVICE_CHECK_STEP_LIMIT seconds
# (default 150; e2e 240). A step that fails does not stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
OUT="${1:?usage: device_check.sh [--dry-run] OUT_DIR}"
mkdir -p "$OUT"
STEP_LIMIT="${DEVICE_CHECK_STEP_LIMIT:-150}"
export TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[device_check] $*" >&2; }

if [ "$dry_run" = 1 ]; then
    SIZE=(--device cpu --size smoke)
else
    SIZE=(--gpu)
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import sys, torch, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1

if [ -d benchmarks/wheels ] && ! python -c "import snakemake" 2>/dev/null; then
    log "installing the carried wheels (benchmarks/wheels)"
    python -m pip install -q --no-index --find-links benchmarks/wheels benchmarks/wheels/*.whl > "$OUT/wheels.log" 2>&1 \
        || log "wheels: install failed (see $OUT/wheels.log); e2e will say so"
fi

printf 'step\texit\tseconds\n' > "$OUT/status.tsv"
step() {  # step NAME LIMIT COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    log "$name: $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >> "$OUT/status.tsv"
    log "$name: exit $code after $((SECONDS - start)) s"
}

step flops "$STEP_LIMIT" python benchmarks/run.py "${SIZE[@]}" --only flops --json "$OUT/flops.json"
step decoding "$STEP_LIMIT" python benchmarks/run.py "${SIZE[@]}" --only decoding --json "$OUT/decoding.json"
step sampler "$STEP_LIMIT" python benchmarks/run.py "${SIZE[@]}" --only sampler --json "$OUT/sampler.json"
step fresh "$STEP_LIMIT" python benchmarks/run.py "${SIZE[@]}" --only fresh --json "$OUT/fresh.json"
if [ "$dry_run" = 1 ]; then
    step cuda "$STEP_LIMIT" python -m pytest -q -p no:cacheprovider --collect-only tests/test_coupled_sampler.py
    log "e2e: not run in a dry run (the whole workflow; benchmarks/run.py --e2e runs it on CPU)"
else
    step cuda "$STEP_LIMIT" python -m pytest -q -p no:cacheprovider -rs -k cuda tests/
    step e2e "${DEVICE_CHECK_E2E_LIMIT:-240}" python benchmarks/run.py --e2e --gpu --json "$OUT/e2e.json"
fi
cat "$OUT/status.tsv" >&2
