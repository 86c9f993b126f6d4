#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in about 8 minutes, what tinv's training costs at real sizes.
#
#   bash benchmarks/gpu_check.sh              # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry_run    # the same sequence at toy size on the CPU (the suite runs this)
#
# It prints (benchmarks/bench_train.py tables) textual-inversion and hypernetwork steps/s, peak
# allocated memory and the ratio to the floor (the bare loop on the same model) at the SD 1.5
# (`sd15`, 512 px) and SDXL (`sdxl`, 1024 px) sizes in bf16, with and without gradient
# checkpointing and 8-bit AdamW. It then trains in fp16 to exercise the grad scaler, and once at
# an absurd learning rate to check that the NaN guard stops the run with its message. Models are
# built from config with random weights into $GPU_CHECK_WORKDIR (default: output/gpu_check),
# which later runs reuse. Without CUDA it refuses in one line.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${GPU_CHECK_WORKDIR:-output/gpu_check}"
export HF_HUB_OFFLINE=1

if [ "${1:-}" = "--dry_run" ]; then
    # CPU, toy sizes, every stage once: checks the plumbing, not the numbers.
    sizes=("micro:64")
    precision=no
    timing=(--steps 2 --warmup 1 --repeats 1 --inline --no_memory)
    variants="default,+gradient_checkpointing"
    workdir="${GPU_CHECK_WORKDIR:-$(mktemp -d)}"
else
    if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False); use --dry_run for the CPU rehearsal" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    sizes=("sd15:512" "sdxl:1024")
    precision=bf16
    timing=(--steps 10 --warmup 3 --repeats 1)
    variants="default,+gradient_checkpointing,+8bit,+gradient_checkpointing+8bit"
fi
mkdir -p "$workdir"

for entry in "${sizes[@]}"; do
    preset="${entry%%:*}"
    resolution="${entry##*:}"
    echo "== $preset at ${resolution} px, $precision: TI and HN against the floor"
    python benchmarks/bench_train.py --preset "$preset" --resolution "$resolution" --mixed_precision "$precision" \
        "${timing[@]}" --variants="$variants" --workdir "$workdir/$preset" --json "$workdir/$preset.json"
done

first="${sizes[0]%%:*}"
model=$(find "$workdir/$first" -maxdepth 2 -name model_index.json -printf '%h\n' | head -n 1)
images=$(find "$workdir/$first" -maxdepth 1 -type d -name 'images-*' | head -n 1)
common=(--pretrained_model_name_or_path "$model" --train_data_dir "$images" --placeholder_token gpu-check
        --resolution "${sizes[0]##*:}" --train_batch_size 2 --validation_steps 0 --save_steps 0 --report_to none)
if [ "$precision" = bf16 ]; then fp16=fp16; else fp16=no; fi

echo "== fp16 training (grad scaler): 20 steps"
python train_textual_inversion.py "${common[@]}" --mixed_precision "$fp16" --max_train_steps 20 \
    --checkpointing_steps 10 --output_dir "$workdir/fp16"
test -f "$workdir/fp16/checkpoint-20/state.json"
if [ "$fp16" = fp16 ]; then test -f "$workdir/fp16/checkpoint-20/scaler.pt"; fi

echo "== NaN guard: learning rate 1e30 must stop the run with exit code 3 and keep no file"
set +e
python train_textual_inversion.py "${common[@]}" --mixed_precision "$fp16" --max_train_steps 20 \
    --checkpointing_steps 0 --learning_rate 1e30 --output_dir "$workdir/nan" 2> "$workdir/nan.err"
code=$?
set -e
grep -q "error: loss became" "$workdir/nan.err"
if [ "$code" != 3 ] || [ -e "$workdir/nan/gpu-check.pt" ]; then
    echo "gpu_check.sh: the NaN guard did not stop the run (exit $code)" >&2
    exit 1
fi
echo "gpu_check.sh: all stages passed"
