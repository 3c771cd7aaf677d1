#!/usr/bin/env bash
# One call of the lent GPU machine: the GPU tests and the suites whose numbers are in
# BENCHMARKS.md, each step with its own time limit, logs and JSON under $OUT.
#   bash benchmarks/gpu_session.sh tests kernels comm          # steps, in order
# Steps: tests (pytest -m gpu), kernels (attention kernels rows), comm (pynccl vs torch's
# NCCL on one GPU), models (diffusers' Wan through parallelize at world 1), dit (VideoDiT
# eager/compiled vs diffusers' Wan), dit_wan (the same, one command: dit.compare=wan), train (the Wan-sized diffusers training step),
# newgpu (the GPU tests of the round-3 modules: VAE, compile, elementwise, the bf16 key-bias
# attention kernels), families (each plan family at its published size vs plain diffusers;
# FAMILIES_ARGS adds flags, e.g. --families ltx,mochi), lora (LoRA vs full fine-tuning, in
# bf16 and in the recipes' bf16-mixed),
# pipeline (each stage of a prompt-to-video generation vs diffusers' WanPipeline, the whole
# call step by step, the world-1 transformer forward vs plain diffusers; then returning
# 388 MB of frames from a worker before/after the shared buffer vs diffusers in process,
# unless SKIP_FRAMES_RETURN is set),
# vae_encode (vidpar-preprocess's Wan2.1 VAE encode of 81 × 480 × 832 at world 1, videos/min),
# scaling (issue #33: every layout of each world on all visible GPUs; SCALING_WORLDS,
# SCALING_MODELS, SCALING_STEPS, SCALING_LAYOUTS override; the Executor starts one worker per GPU),
# compile_world1 (issue #32: the compiled world-1 Wan2.1-1.3B forward from the pre-#32 tree in
# .before — `mkdir .before && git archive a05e217 plugin | tar -x -C .before` — and from this
# one, 3 alternations, and the ratio; COMPILE_WORLD1_ARGS adds flags, e.g. --layers 10).
# Wheels the machine lacks travel in .whl (see the device tool's README).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/vidpar-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/plugin:/tmp/site
else
  export PYTHONPATH=$PWD/plugin
fi
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, lightning, diffusers, sys
print(sys.version.split()[0], "torch", torch.__version__, "lightning", lightning.__version__,
      "diffusers", diffusers.__version__, torch.cuda.get_device_name(0),
      "cudnn", torch.backends.cudnn.version())
PY
bench() {  # bench NAME TIMEOUT OVERRIDES...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m vidpar.cli.bench device=cuda output="$OUT/$name.json" \
    hydra.run.dir="$OUT/hydra-$name" "$@" 2>&1 | tee "$OUT/$name.txt"
}
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests)
      timeout 150 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/distributed/test_pynccl.py \
        tests/distributed/test_pynccl_gpu.py tests/distributed/test_cuda_communicator.py 2>&1 | tee "$OUT/tests_pynccl.txt"
      timeout 300 python3 -m pytest -q -rs -m gpu -p no:cacheprovider --ignore=tests/distributed/test_pynccl.py \
        --ignore=tests/distributed/test_pynccl_gpu.py --ignore=tests/distributed/test_cuda_communicator.py \
        --ignore=tests/lightning/test_diffusers_gpu.py tests 2>&1 | tee "$OUT/tests_gpu.txt" ;;
    kernels) bench attention_kernels 240 suite=attention attention.modes=[] repeats=10 ;;
    comm) bench communicators 150 suite=communicators ;;
    models) bench models 240 suite=models repeats=4 warmup=1 runs=3 ;;
    dit) bench dit 330 suite=dit ${DIT_ARGS:-} ;;
    dit_wan) bench dit_wan 570 suite=dit dit.compare=wan repeats=4 warmup=1 runs=3 ;;
    newgpu) VIDPAR_GPU_OUT=$OUT timeout 240 python3 -m pytest -q -rs -s -m gpu -p no:cacheprovider \
        tests/models/test_parallel_vae_gpu.py tests/end_to_end/test_gpu.py tests/nn/test_elementwise.py \
        tests/nn/test_attention_kernels.py::test_cuda_backend_with_a_key_bias_matches_masked_sdpa 2>&1 | tee "$OUT/newgpu.txt" ;;
    families) timeout 480 python3 benchmarks/families_gpu.py --runs 3 ${FAMILIES_ARGS:-} --out "$OUT/families_gpu.json" \
        2>&1 | tee "$OUT/families.txt" ;;
    lora) timeout 300 python3 benchmarks/lora_vs_full.py --steps 5 2>&1 | tee "$OUT/lora.txt"
      timeout 300 python3 benchmarks/lora_vs_full.py --steps 5 --precision bf16-mixed 2>&1 \
        | tee "$OUT/lora_mixed.txt" ;;
    pipeline) timeout 560 python3 benchmarks/pipeline_stages.py --root /tmp/wan-random \
        --layouts single --steps ${PIPELINE_STEPS:-4} --runs 3 --out "$OUT/pipeline_stages.json" 2>&1 | tee "$OUT/pipeline.txt"
      [ -n "${SKIP_FRAMES_RETURN:-}" ] || timeout 240 python3 benchmarks/frames_return.py --device cuda --runs 7 \
        --out "$OUT/frames_return.json" 2>&1 | tee "$OUT/frames_return.txt" ;;
    vae_encode) timeout 300 python3 benchmarks/vae_encode.py --runs ${VAE_ENCODE_RUNS:-3} \
        --out "$OUT/vae_encode.json" 2>&1 | tee "$OUT/vae_encode.txt" ;;
    scaling) timeout 590 python3 benchmarks/scaling.py --device cuda --worlds ${SCALING_WORLDS:-1,2,4,8} \
        --models ${SCALING_MODELS:-1.3b} --steps ${SCALING_STEPS:-4} ${SCALING_LAYOUTS:+--layouts $SCALING_LAYOUTS} \
        --root /tmp/wan-scaling --out "$OUT/scaling.json" --plot "$OUT/scaling.png" 2>&1 | tee "$OUT/scaling.txt" ;;
    compile_world1)
      if [ ! -d .before/plugin ]; then
        echo "compile_world1: no .before/plugin (git archive a05e217 plugin | tar -x -C .before)"
      else
        rm -f "$OUT/compile_world1.jsonl"
        for round in 1 2 3; do
          for label in before now; do
            root=$PWD; [ $label = before ] && root=$PWD/.before
            PYTHONPATH=$root/plugin${PYTHONPATH#$PWD/plugin} timeout 180 python3 \
              benchmarks/compiled_world1.py --label $label ${COMPILE_WORLD1_ARGS:-} \
              2>>"$OUT/compile_world1.err" | tee -a "$OUT/compile_world1.jsonl"
          done
        done
        python3 benchmarks/compiled_world1.py --summarize "$OUT/compile_world1.jsonl" \
          | tee "$OUT/compile_world1.json"
      fi ;;
    train) timeout 300 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/lightning/test_diffusers_gpu.py \
        2>&1 | tee "$OUT/train.txt" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done $(date +%T)"
