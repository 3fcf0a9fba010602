#!/usr/bin/env bash
# The GPU paths, checked on a lent CUDA machine (CI has none): the engine and the TRL trainers on CUDA, then the
# training and generation benchmarks there. The machine has torch/transformers/peft but no network, so:
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

config = AutoConfig.from_pretrained(".gpu/smollm2-shape")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
model.save_pretrained("/tmp/smollm2-random")
AutoTokenizer.from_pretrained(".gpu/smollm2-shape").save_pretrained("/tmp/smollm2-random")
print("random SmolLM2-135M-shaped model:", sum(p.numel() for p in model.parameters()) / 1e6, "M params")
EOF
LEAP_DSPY_TEST_TOKENIZER=$PWD/.gpu/smollm2-shape python3 -m pytest -q -p no:cacheprovider \
  tests/test_devices.py tests/test_train.py 2>&1 | tee "$OUT/pytest.log"
python3 bench/train.py --model /tmp/smollm2-random --rows 128 2>&1 | grep -v Warning | tee "$OUT/bench_train.log"
python3 bench/train.py --model /tmp/smollm2-random --rows 2048 --batch 64 2>&1 | grep -v Warning \
  | tee -a "$OUT/bench_train.log"
python3 -m leap_dspy.lm.bench --model /tmp/smollm2-random --dtypes bfloat16 --prefix on --batches 1 8 64 256 \
  --rows1 8 --new 48 2>&1 | tee "$OUT/bench_generate.log"
