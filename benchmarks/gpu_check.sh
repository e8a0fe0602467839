#!/usr/bin/env bash
# The GPU figures of docs/PERFORMANCE.md in one command, for a machine lent for a few minutes (the device tool).
#
#   bash benchmarks/device_wheels.sh             # here, once: the wheels the device image lacks, into .whl/
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)     # on the device
#
# First the self-check (python -m smolppo.selfcheck --device cuda: PPO fp32/bf16, full/LoRA, GRPO, resume, evaluation
# on the smoke models, each as its own process), so that the first minutes on a GPU say whether the code works
# there at all (SELFCHECK_SECONDS, default 130). Then four cases of bench_ppo.py on the SmolLM2-135M shape, bf16,
# 64 prompts of <= 512 tokens, 128-token responses: full fine-tune, LoRA, full fine-tune with a static KV cache
# (transformers then compiles the decoding step on CUDA), and full fine-tune with vLLM rollouts (where vLLM is
# installed). Each case has its own time limit (CASE_SECONDS, default 100; the static case 1.6x that, for
# compiling), so one slow case cannot cost the others: at most 590 s in all.
# Writes at most 8 files to $OUT (the device tool returns no more): environment.log (with the self-check's lines),
# selfcheck.json, bench_<case>.json, and bench_<case>.log only for a case that failed (its tail is printed either way).
# GPU_CHECK_DRY_RUN=1 runs the same three cases on the tiny shape on CPU (seconds), to try the script itself.
set -uo pipefail
OUT=${OUT:-./gpu_check_output}
CASE_SECONDS=${CASE_SECONDS:-100}
SELFCHECK_SECONDS=${SELFCHECK_SECONDS:-130}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
{
    nvidia-smi
    python3 - <<'EOF'
import importlib.metadata as metadata

import torch

print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "tokenizers", "huggingface_hub"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "MISSING")
EOF
} >"$OUT/environment.log" 2>&1
SELFCHECK=(--device cuda)
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && SELFCHECK=(--device cpu --checks ppo-fp32-full,evaluation)
timeout "$SELFCHECK_SECONDS" python3 -m smolppo.selfcheck "${SELFCHECK[@]}" --timeout 120 \
    --output "$OUT/selfcheck.json" >>"$OUT/environment.log" 2>&1
selfcheck_rc=$?
echo "== selfcheck: exit $selfcheck_rc" >>"$OUT/environment.log"
cat "$OUT/environment.log"

COMMON=(--shape smollm2-135m --device cuda --bf16 --rollout-batch-size 64 --mini-batch-size 16
    --per-device-train-batch-size 16 --prompt-length 512 --response-length 128 --warmup-updates 1 --timed-updates 3)
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    COMMON=(--shape tiny --device cpu --bf16 --rollout-batch-size 8 --mini-batch-size 8 --per-device-train-batch-size 4
        --prompt-length 16 --response-length 8 --warmup-updates 0 --timed-updates 1)
fi
status=$(( selfcheck_rc == 0 ? 0 : 1 ))
run_case() {
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python3 benchmarks/bench_ppo.py "${COMMON[@]}" "$@" --output "$OUT/bench_$name.json" \
        >"$OUT/bench_$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc"
    tail -n 14 "$OUT/bench_$name.log"
    if [ "$rc" -eq 0 ]; then rm -f "$OUT/bench_$name.log"; else status=1; fi
}
run_case full "$CASE_SECONDS"
run_case lora "$CASE_SECONDS" --use-lora
run_case static $((CASE_SECONDS * 8 / 5)) --generation-cache static
# The same work with rollouts from a colocated vLLM engine (bf16), where vLLM is installed (requirements-vllm.txt)
VLLM_FLAGS=(--generation-backend vllm)
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && VLLM_FLAGS+=(--shape tiny32)  # vLLM's CPU attention needs heads of 32
if python3 -c "import vllm" >/dev/null 2>&1; then
    run_case vllm "$CASE_SECONDS" "${VLLM_FLAGS[@]}"
else
    echo "== vllm: skipped (vLLM is not installed here: pip install -r requirements-vllm.txt)"
fi
exit "$status"
