#!/usr/bin/env bash
# The GPU paths, checked on a lent CUDA machine (CI has none): the engine and the TRL trainers on CUDA, then the
# training benchmark there on SmolLM2-135M's shape and SmolLM2-1.7B's, plain, compiled and with Liger's kernels
# (generation: `python -m leap_dspy.lm.bench`, docs/performance.md). The machine has torch/transformers/peft but no network, so:
#   - wheels of TRL and the pinned transformers/peft/datasets travel in .whl/ (pip download --python-version
#     of the machine's Python; see README "GPU"), installed with --no-deps into /tmp/site;
#   - the embedded GGUF does not travel (too large): .gpu/smollm2-shape holds SmolLM2-135M's config and
#     tokenizer, and the benchmarks run a randomly initialised model of exactly that shape (speed does not
#     depend on the weights' values; every generated row runs its full token budget).
# Writes its logs under $OUT (default /tmp/device-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LEAP_DSPY_CACHE=/tmp/leap-dspy-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, peft, trl, datasets, pyarrow
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__,
      'peft', peft.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)
print('vllm', 'installed' if __import__('importlib').util.find_spec('vllm') else 'not installed')" || exit 1
python3 - <<'EOF' || exit 1
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# SmolLM2-135M's shape, and SmolLM2-1.7B's (the same family, 12x the parameters): matmuls large enough to keep
# the GPU busy.
shapes = {"smollm2-random": {}, "smollm2-1.7b-random": dict(hidden_size=2048, intermediate_size=8192,
                                                             num_hidden_layers=24, num_attention_heads=32,
                                                             num_key_value_heads=32, head_dim=64)}
torch.manual_seed(0)
for name, changes in shapes.items():
    config = AutoConfig.from_pretrained(".gpu/smollm2-shape", **changes)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(f"/tmp/{name}")
    AutoTokenizer.from_pretrained(".gpu/smollm2-shape").save_pretrained(f"/tmp/{name}")
    print(name, sum(p.numel() for p in model.parameters()) / 1e6, "M params")
EOF
LEAP_DSPY_TEST_TOKENIZER=$PWD/.gpu/smollm2-shape timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_devices.py tests/test_train.py -k "${TESTS:-not nothing}" 2>&1 | tail -15 | tee "$OUT/pytest.log"
bench() {  # one bench/train.py run, bounded, appended to the log under its flags
  echo "### bench/train.py $*" | tee -a "$OUT/bench_train.log"
  timeout 200 python3 bench/train.py "$@" 2>&1 | grep -v -i warn | tail -14 | tee -a "$OUT/bench_train.log"
}
small=/tmp/smollm2-random large=/tmp/smollm2-1.7b-random
bench --model $small --rows 4096 --batch 64 --warmup-steps 2
bench --model $small --rows 4096 --batch 256 --warmup-steps 2
bench --model $small --rows 4096 --batch 256 --warmup-steps 3 --compile
bench --model $small --rows 4096 --batch 256 --warmup-steps 2 --liger
bench --model $large --rows 1024 --batch 16 --warmup-steps 2
bench --model $large --rows 2048 --batch 64 --warmup-steps 2
bench --model $large --rows 2048 --batch 64 --warmup-steps 3 --compile
