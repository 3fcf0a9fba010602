"""The engine and the trainers on every device this machine has: the CPU always, CUDA where a GPU is present.

CI has no GPU, so there the CUDA cases skip; `bench/device_check.sh` runs this file (and test_train.py) on a
lent GPU. Random weights make greedy decoding full of near-ties, so batched generation is checked against what
it must equal, not against a second batched run: every token it picks is the argmax (within the dtype's rounding)
of a plain, unbatched, unpadded forward pass over that row's own prompt and answer so far.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

HEAD = ("Inputs: task, history, observation. Outputs: reason (one sentence), action (exactly one admissible "
        "action). Act in a text environment to complete the task.")
TAILS = ["put a mug in desk 1", "heat an apple and put it in fridge", "look at the book under the desklamp, "
         "the book may be on a shelf or a desk", "clean a plate", "go"]


def _prompts(tokenizer) -> list[list[int]]:
    head = tokenizer.encode(HEAD)
    return [head + tokenizer.encode(" " + tail) for tail in TAILS]


@pytest.mark.parametrize("draft", [0, 4], ids=["one-token-steps", "drafts"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_greedy_picks_each_rows_own_argmax(tiny_model, device, dtype, draft):
    """The batched path (shared prefix computed once, rows prefilled in length chunks, left pads masked,
    finished rows dropped; with drafts, several fed tokens a row and rejected ones masked) picks, at every step
    of every row, a token whose logit is the row's unbatched maximum up to rounding."""
    from leap_dspy.lm.generate import Generator, GenParams
    from leap_dspy.lm.kernels import prepare_for_inference
    from leap_dspy.lm.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, dtype=dtype, device=device)
    prepare_for_inference(model)
    assert model.device.type == device and model.dtype == getattr(torch, dtype)
    generator = Generator(model, tokenizer, prefix_cache=True, prefill_waste=0.0, draft_budget=1024)
    prompts = _prompts(tokenizer)
    results = generator.generate(prompts, GenParams(max_new_tokens=12, ignore_eos=True, draft_tokens=draft))
    assert generator.stats.prefill_tokens < sum(len(p) for p in prompts)  # the shared head ran once
    assert generator.stats.extra["prefill_chunks"] > 1
    if draft:
        assert generator.stats.extra["kept"] > 0
    tolerance = 1e-3 if dtype == "float32" else 0.15
    with torch.inference_mode():
        for prompt, result in zip(prompts, results, strict=True):
            assert len(result.token_ids) == 12
            ids = torch.tensor([prompt + result.token_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(-1, torch.tensor(result.token_ids, device=device)[:, None])[:, 0]
            gap = (logits.max(-1).values - chosen).max().item()
            assert gap <= tolerance, (device, dtype, gap)


@needs_cuda
def test_sft_on_cuda_trains_a_bf16_base_and_serves_the_adapter(tiny_model, tmp_path):
    """On a GPU the default dtype is bf16 and TRL trains on CUDA; the adapter it saves then loads, merged, onto
    the GPU for generation."""
    from leap_dspy.lm.generate import Generator, GenParams
    from leap_dspy.lm.models import load_model_with_adapter, load_tokenizer, pick_dtype
    from leap_dspy.train import TrainConfig, train_sft

    assert pick_dtype("auto") == torch.bfloat16
    prompt = [{"role": "system", "content": HEAD}, {"role": "user", "content": "put a mug in desk 1"}]
    rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": "go to desk 1"}]}] * 16
    config = TrainConfig(max_steps=12, per_device_batch_size=4, learning_rate=5e-3, progress_bar=False)
    result = train_sft(rows, model=tiny_model, output_dir=tmp_path / "adapter", config=config)
    assert result.loss_history[-1] < result.loss_history[0] - 0.5, result.loss_history
    model = load_model_with_adapter(tiny_model, tmp_path / "adapter")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = Generator(model, tokenizer).generate([list(ids)], GenParams(max_new_tokens=6))
    assert out[0].text.startswith("go to desk"), out[0].text
