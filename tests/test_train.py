"""Fine-tuning backends on a tiny randomly initialised Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from leap_dspy.lm.models import load_tokenizer  # noqa: E402
from leap_dspy.train import TrainConfig, merge_adapter, train_dpo, train_kto, train_sft  # noqa: E402
from leap_dspy.train.data import encode_prompt_completion, sft_features  # noqa: E402

CUDA = torch.cuda.is_available()

SYSTEM = "Your input fields are `task` and `observation`. Your output fields are `reason` and `action`."


def _prompt(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"[[ ## task ## ]]\nput a mug in desk {i % 3}\n\n[[ ## observation ## ]]\nroom"},
    ]


def _answer(action: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"[[ ## reason ## ]]\nsee desk\n\n[[ ## action ## ]]\n{action}\n\n"
             "[[ ## completed ## ]]"}]


def sft_rows(n: int = 8) -> list[dict]:
    return [{"prompt": _prompt(i), "completion": _answer("go to desk 1")} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_source):
    return load_tokenizer(tokenizer_source)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def fast(**overrides) -> TrainConfig:
    base = dict(max_steps=4, per_device_batch_size=4, gradient_accumulation=1, learning_rate=5e-3, progress_bar=False,
                dtype="float32")
    return TrainConfig(**{**base, **overrides})


def _lora_state(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_training_text_is_the_inference_prompt_plus_completion(tokenizer):
    row = sft_rows(1)[0]
    p_ids, c_ids = encode_prompt_completion(tokenizer, row["prompt"], row["completion"])
    inference_prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert p_ids == tokenizer(inference_prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert p_ids + c_ids == full_ids[: len(p_ids) + len(c_ids)]
    assert c_ids[-1] == tokenizer.convert_tokens_to_ids(tokenizer.eos_token)  # learns to stop at <|im_end|>
    assert tokenizer.decode(full_ids[len(p_ids) + len(c_ids):]).strip() == ""  # only the template's newline left
    assert tokenizer.decode(c_ids).startswith("[[ ## reason ## ]]")
    # DPO/KTO hand TRL these strings; TRL tokenises plain text with tokenizer(text): no extra special tokens
    assert tokenizer(inference_prompt)["input_ids"] == p_ids


def test_labels_mask_the_prompt(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = sft_rows(2)
    features = sft_features(tokenizer, rows, max_length=None)
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(
        [{"input_ids": i, "labels": la} for i, la in zip(features["input_ids"], features["labels"], strict=True)]
    )
    for k, row in enumerate(rows):
        p_ids, c_ids = encode_prompt_completion(tokenizer, row["prompt"], row["completion"])
        labels = batch["labels"][k]
        assert (labels[: len(p_ids)] == -100).all()
        assert labels[len(p_ids): len(p_ids) + len(c_ids)].tolist() == c_ids
        assert (labels[len(p_ids) + len(c_ids):] == -100).all()  # padding


def test_max_length_cuts_the_prompt_not_the_completion(tokenizer):
    row = sft_rows(1)[0]
    _, c_full = encode_prompt_completion(tokenizer, row["prompt"], row["completion"])
    p_ids, c_ids = encode_prompt_completion(tokenizer, row["prompt"], row["completion"], max_length=len(c_full) + 5)
    assert c_ids == c_full and len(p_ids) == 5


def test_sft_loss_decreases_and_saves_adapter(tiny_model, tmp_path):
    out = tmp_path / "adapter"
    result = train_sft(sft_rows(), model=tiny_model, output_dir=out, config=fast(max_steps=6))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter.tmp").exists()
    assert result.steps == 6 and len(result.loss_history) == 6
    assert result.loss_history[-1] < result.loss_history[0] - 0.1
    per_epoch = sum(len(ids) for ids in sft_features(load_tokenizer(tiny_model), sft_rows(), None)["input_ids"])
    assert result.train_tokens == 3 * per_epoch  # 6 steps x 4 rows = 3 epochs of 8 rows, padding not counted
    assert result.tokens_per_s > 0 and result.peak_rss_mb > 0


def test_lora_targets_are_checked_against_the_model_and_all_linear_is_peft_s(tiny_model, tmp_path):
    """A misspelt target among several would train without it (PEFT fails only when none matches): refused
    before a run starts; PEFT's `all-linear` shorthand trains every projection."""
    from leap_dspy.train.common import TargetModulesNotFound, check_target_modules

    check_target_modules(tiny_model, fast())
    with pytest.raises(TargetModulesNotFound, match="v_prj: no such module.*q_proj"):
        check_target_modules(tiny_model, fast(target_modules=["q_proj", "v_prj"]))
    out = tmp_path / "adapter"
    train_sft(sft_rows(), model=tiny_model, output_dir=out, config=fast(max_steps=1, target_modules=["all-linear"]))
    adapted = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert {name.rsplit(".", 1)[-1] for name in adapted} == set(TrainConfig().target_modules)


def test_lora_targets_are_checked_on_a_fresh_machine(tmp_path, monkeypatch):
    """The check is the first to resolve the model on a fresh machine, and resolving converts the embedded GGUF
    (or builds the tiny model): done under the meta device, the README's first compile failed there."""
    from safetensors.torch import load_file

    from leap_dspy.lm.models import DEFAULT_MODEL, TINY_MODEL, resolve_model
    from leap_dspy.train.common import check_target_modules

    monkeypatch.setenv("LEAP_DSPY_CACHE", str(tmp_path))
    for model in (TINY_MODEL, DEFAULT_MODEL):
        check_target_modules(model, TrainConfig())
        weights = load_file(str(Path(resolve_model(model)) / "model.safetensors"))
        assert all(w.device.type == "cpu" for w in weights.values())
        assert any(w.abs().sum() > 0 for w in weights.values())


def test_a_fine_tune_of_one_step_trains(tiny_model, tmp_path):
    """A warmup ratio is floored to whole steps: rounded up, a short fine-tune's first step ran at a learning
    rate of 0, and a fine-tune of one step left LoRA's B matrices at their zeros."""
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    train_sft(sft_rows(), model=tiny_model, output_dir=out, config=fast(max_steps=1, warmup_ratio=0.05))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)


def test_a_default_fine_tunes_warmup_is_transformers_own() -> None:
    """Only a warmup under one step is dropped: the default rounds (30 steps) and behaviour cloning (60) keep the
    warmup the published results trained with (2 and 3 steps at a ratio of 0.05)."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from leap_dspy.train.common import _no_part_warmup

    def warmup(steps: int, ratio: float = 0.05) -> int:
        args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
        trainer = SimpleNamespace(args=args, create_scheduler=lambda num_training_steps, optimizer=None: None)
        _no_part_warmup(trainer)
        trainer.create_scheduler(num_training_steps=steps)
        return args.get_warmup_steps(steps)

    assert [warmup(n) for n in (1, 19, 20, 30, 60)] == [0, 0, 1, 2, 3]
    assert warmup(30, ratio=1.0) == 30


def test_sft_continues_from_init_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = tmp_path / "iter0"
    r0 = train_sft(sft_rows(), model=tiny_model, output_dir=first, config=fast(max_steps=6))
    # zero-step continuation: the saved adapter must equal the init adapter exactly
    same = tmp_path / "same"
    train_sft(sft_rows(), model=tiny_model, output_dir=same, init_adapter=str(first), config=fast(learning_rate=0.0))
    a, b = _lora_state(first), _lora_state(same)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and a real continuation starts from the trained loss, not from scratch
    second = tmp_path / "iter1"
    r1 = train_sft(sft_rows(), model=tiny_model, output_dir=second, init_adapter=str(first), config=fast())
    assert r1.loss_history[0] < r0.loss_history[0] - 0.1
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    loaded = PeftModel.from_pretrained(base, str(second))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())


def test_failed_training_leaves_no_adapter(tiny_model, tmp_path, monkeypatch):
    import leap_dspy.train.common as common

    out = tmp_path / "adapter"

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(common, "save_adapter", boom)
    with pytest.raises(RuntimeError, match="killed"):
        train_sft(sft_rows(4), model=tiny_model, output_dir=out, config=fast(max_steps=1))
    assert not out.exists() and not (tmp_path / "adapter.tmp").exists()
    # an adapter already at output_dir survives a failed retraining untouched
    monkeypatch.undo()
    train_sft(sft_rows(4), model=tiny_model, output_dir=out, config=fast(max_steps=1))
    before = _lora_state(out)
    monkeypatch.setattr(common, "save_adapter", boom)
    with pytest.raises(RuntimeError):
        train_sft(sft_rows(4), model=tiny_model, output_dir=out, config=fast(max_steps=1, learning_rate=1e-2))
    after = _lora_state(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dpo_runs_and_saves(tiny_model, tmp_path):
    rows = [{"prompt": _prompt(i), "chosen": _answer("go to desk 1"), "rejected": _answer("look")} for i in range(4)]
    out = tmp_path / "dpo"
    result = train_dpo(rows, model=tiny_model, output_dir=out, config=fast(max_steps=2, per_device_batch_size=2))
    assert (out / "adapter_model.safetensors").exists() and result.steps == 2 and result.final_loss is not None
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


def test_dpo_reference_is_the_policy_it_continues_from(tiny_model, tmp_path):
    """Iterative DPO: continuing from an adapter, the first step compares the policy with itself (implicit
    rewards 0, loss log 2), although that adapter is far from the base model on these rows."""
    sft = tmp_path / "sft"
    train_sft(sft_rows(), model=tiny_model, output_dir=sft, config=fast(max_steps=6))
    rows = [{"prompt": _prompt(i), "chosen": _answer("look"), "rejected": _answer("go to desk 1")} for i in range(4)]
    previous = train_dpo(rows, model=tiny_model, output_dir=tmp_path / "dpo-prev", init_adapter=str(sft),
                         config=fast(max_steps=1, per_device_batch_size=4))
    assert previous.loss_history[0] == pytest.approx(math.log(2), abs=1e-4)
    fresh = train_dpo(rows, model=tiny_model, output_dir=tmp_path / "dpo-fresh",
                      config=fast(max_steps=4, per_device_batch_size=4, learning_rate=5e-2))
    assert abs(fresh.loss_history[-1] - math.log(2)) > 0.01  # a policy that moved is not at log 2


@pytest.mark.skipif(CUDA, reason="a CPU's path through TRL's head; on CUDA, Triton's is compact already")
def test_preference_training_scores_the_completions_alone_and_trains_the_same_adapter(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """On a CPU TRL runs its fused head over every position of a DPO batch, the prompts' included; it runs over
    the completions alone here, with the same losses and the same adapter."""
    import contextlib

    import trl.trainer.utils as trl_utils

    import leap_dspy.train.preference as preference

    scored: list[int] = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counted(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counted)
    rows = [{"prompt": _prompt(i), "chosen": _answer("look"), "rejected": _answer(f"go to desk {i}")}
            for i in range(4)]
    config = fast(max_steps=2, per_device_batch_size=4, learning_rate=5e-2)
    alone = train_dpo(rows, model=tiny_model, output_dir=tmp_path / "alone", config=config)
    positions, scored[:] = sum(scored), []
    monkeypatch.setattr(preference, "_completions_scored_alone", contextlib.nullcontext)  # TRL's own choice
    every = train_dpo(rows, model=tiny_model, output_dir=tmp_path / "every", config=config)
    assert 0 < positions < sum(scored) / 2
    assert alone.loss_history == pytest.approx(every.loss_history, rel=1e-5)
    weights, reference = _lora_state(tmp_path / "alone"), _lora_state(tmp_path / "every")
    assert all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)


def test_kto_runs_and_saves(tiny_model, tmp_path):
    rows = [{"prompt": _prompt(i), "completion": _answer("go to desk 1" if i % 2 else "look"), "label": bool(i % 2)}
            for i in range(4)]
    out = tmp_path / "kto"
    result = train_kto(rows, model=tiny_model, output_dir=out, config=fast(max_steps=2, per_device_batch_size=2))
    assert (out / "adapter_model.safetensors").exists() and result.steps == 2


def test_kto_needs_both_kinds(tiny_model, tmp_path):
    rows = [{"prompt": _prompt(i), "completion": _answer("look"), "label": True} for i in range(4)]
    with pytest.raises(ValueError, match="undesirable"):
        train_kto(rows, model=tiny_model, output_dir=tmp_path / "kto", config=fast())
    assert not (tmp_path / "kto").exists()


def test_merge_adapter_matches_peft_outputs(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    train_sft(sft_rows(4), model=tiny_model, output_dir=adapter, config=fast(max_steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged_dir = merge_adapter(tiny_model, adapter, tmp_path / "merged", dtype="float32")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-4)


def test_adapters_compute_in_the_base_dtype_with_float32_master_weights(tiny_model):
    """Under `adapters_in_base_dtype` a bf16 base's LoRA layers multiply in bf16 (no float32 copies of the
    activations), gradients reach the float32 adapter weights, every update is seen by the next forward within
    the same context (autocast's cast cache would freeze the first bf16 copy), and a float32 base is left alone."""
    import torch

    from leap_dspy.train.common import adapters_in_base_dtype, load_trainable_model

    seen: list[torch.dtype] = []
    for dtype in ("bfloat16", "float32"):
        model, tokenizer = load_trainable_model(tiny_model, fast(dtype=dtype))
        lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
        hook = lora_a.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.tensor([tokenizer.encode("go to shelf 1, take mug 1 from shelf 1")], device=model.device)
        losses = []
        with adapters_in_base_dtype(model):
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                assert lora_a.weight.dtype == torch.float32 and lora_a.weight.grad is not None
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        hook.remove()
        assert losses[2] < losses[1] < losses[0], losses
    assert set(seen[:3]) == {torch.bfloat16} and set(seen[3:]) == {torch.float32}


@pytest.mark.skipif(CUDA, reason="a CPU's choice of attention kernel; on CUDA the trainers run on the GPU")
def test_long_rows_train_with_the_fused_attention_kernel_on_a_cpu(tiny_model, tmp_path):
    """Eager attention keeps length² scores per row for the backward: on a CPU, "auto" trains with sdpa in
    float32 and in bf16 (an explicit choice is kept), and the same long rows train the same either way (within
    float rounding), so only memory and speed change."""
    from leap_dspy.train.common import load_trainable_model

    for dtype in ("float32", "bfloat16"):
        model, _ = load_trainable_model(tiny_model, fast(dtype=dtype))
        assert model.get_base_model().config._attn_implementation == "sdpa", dtype
    model, _ = load_trainable_model(tiny_model, fast(dtype="bfloat16", attn_implementation="eager"))
    assert model.get_base_model().config._attn_implementation == "eager"

    long_rows = [{"prompt": [{"role": "user", "content": "look around. " * 120 + f"Room {i}."}],
                  "completion": [{"role": "assistant", "content": f"open box {i}"}]} for i in range(4)]
    losses = {attn: train_sft(long_rows, model=tiny_model, output_dir=tmp_path / attn,
                              config=fast(attn_implementation=attn, max_steps=2)).loss_history
              for attn in ("auto", "eager")}
    assert losses["auto"] == pytest.approx(losses["eager"], rel=1e-3)


def test_a_compiled_backbone_trains_the_same_adapter(tiny_model, tmp_path):
    """`torch_compile` changes how the backbone runs, not what it learns: the same rows give the same losses
    (within float rounding: fused kernels sum in another order) and an adapter with the same tensors."""
    runs = {flag: train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / str(flag),
                            config=fast(torch_compile=flag, max_steps=3))
            for flag in (False, True)}
    assert runs[True].loss_history == pytest.approx(runs[False].loss_history, rel=5e-3)
    plain, compiled = _lora_state(tmp_path / "False"), _lora_state(tmp_path / "True")
    assert compiled.keys() == plain.keys()
    for name, tensor in plain.items():
        assert (compiled[name] - tensor).abs().max().item() < 1e-3, name


def test_a_seed_trains_the_same_adapter_whatever_ran_before(tiny_model, tmp_path):
    """The adapter's random start comes from the config's seed, not from the process's global generator, which
    rollouts draw from a varying number of times: a rerun of a seed trains the very same weights."""
    import torch

    torch.manual_seed(1)
    first = train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / "a", config=fast(max_steps=3))
    torch.rand(1000)
    second = train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / "b", config=fast(max_steps=3))
    assert second.loss_history == first.loss_history
    a, b = _lora_state(tmp_path / "a"), _lora_state(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)
    train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / "c", config=fast(max_steps=3, seed=1))
    assert not all(torch.equal(a[name], t) for name, t in _lora_state(tmp_path / "c").items())


def test_long_rows_train_in_smaller_batches_with_as_many_rows_per_step(tiny_model, tmp_path):
    """`max_batch_tokens` bounds rows x length per forward (the memory of long rows): DPO/KTO's batch halves and
    accumulation grows so an optimizer step still sees the configured number of rows; SFT's steps stay the same."""
    from leap_dspy.train.common import fit_batch, trl_common_args

    config = TrainConfig(per_device_batch_size=4, gradient_accumulation=2, max_batch_tokens=2048)
    assert fit_batch(TrainConfig(), 500) == (8, 1)  # an agent step's rows: all 8 of a step at once
    assert fit_batch(TrainConfig(), 1000) == (4, 2)
    assert fit_batch(config, 500) == (4, 2)
    assert fit_batch(config, 1000) == (2, 4)
    assert fit_batch(config, 4000) == (1, 8)
    assert fit_batch(config, 4000, smallest=2) == (2, 4)  # KTO pairs rows within a batch
    assert fit_batch(config.model_copy(update={"max_batch_tokens": None}), 4000) == (4, 2)
    args = trl_common_args(config, tmp_path, "dpo", 1000)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (2, 4)
    assert fit_batch(config, None) == (4, 2)  # SFT cuts its long batches itself

    rows = [{"prompt": [{"role": "user", "content": "look around. " * 60 + f"Room {i}."}],
             "completion": [{"role": "assistant", "content": f"open box {i}"}]} for i in range(8)]
    steps = {budget: train_sft(rows, model=tiny_model, output_dir=tmp_path / str(budget),
                               config=fast(max_steps=-1, epochs=1, per_device_batch_size=4, gradient_accumulation=2,
                                           max_batch_tokens=budget)).steps
             for budget in (None, 256)}
    assert steps[None] == steps[256] == 1


def test_sft_cuts_a_batch_of_long_rows_into_passes_with_the_whole_batchs_gradient(tiny_model, tmp_path):
    """SFT keeps 8 rows a batch and cuts only a batch whose padded tokens pass `max_batch_tokens` into equal runs
    of rows (one long row no longer shrinks every batch); the passes sum to the whole batch's loss and gradient."""
    from leap_dspy.train.sft import row_chunks

    ids = torch.zeros(8, 300, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": ids, "note": "kept"}
    assert [len(p["input_ids"]) for p in row_chunks(batch, 4096)] == [8]
    assert [len(p["input_ids"]) for p in row_chunks(batch, 2048)] == [4, 4]
    assert [len(p["input_ids"]) for p in row_chunks(batch, 1000)] == [3, 3, 2]
    assert [len(p["input_ids"]) for p in row_chunks(batch, 100)] == [1] * 8
    assert [len(p["input_ids"]) for p in row_chunks(batch, 800)] == [2, 2, 2, 2]  # not 3, 3, 2 (900 tokens)
    assert all(p["note"] == "kept" for p in row_chunks(batch, 1000)) and len(row_chunks(batch, None)) == 1

    rows = [{"prompt": [{"role": "user", "content": "look around. " * (20 + 10 * i) + f"Room {i}."}],
             "completion": [{"role": "assistant", "content": f"open box {i}"}]} for i in range(16)]
    results = {budget: train_sft(rows, model=tiny_model, output_dir=tmp_path / str(budget),
                                 config=fast(max_steps=-1, epochs=1, per_device_batch_size=8, gradient_accumulation=1,
                                             max_batch_tokens=budget))
               for budget in (None, 600)}
    assert results[None].steps == results[600].steps == 2
    assert results[600].loss_history == pytest.approx(results[None].loss_history, rel=1e-4)
    whole, cut = _lora_state(tmp_path / "None"), _lora_state(tmp_path / "600")
    assert all(torch.allclose(whole[name], cut[name], rtol=1e-4, atol=2e-5) for name in whole)  # Adam: 0.4% of a step


def test_a_float32_pass_holds_half_the_tokens_of_a_16_bit_one(tiny_model, tmp_path, monkeypatch):
    """`max_batch_tokens` bounds a pass's memory in 16-bit tokens: float32 activations keep twice the bytes a
    token, so a float32 trainer cuts its batches at half the count."""
    from leap_dspy.train import sft
    from leap_dspy.train.common import activation_cost, fit_batch, load_trainable_model, pass_budget

    bounds: list[int | None] = []
    cut = sft.row_chunks
    monkeypatch.setattr(sft, "row_chunks", lambda inputs, limit: bounds.append(limit) or cut(inputs, limit))
    train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / "a", config=fast(max_steps=1, max_batch_tokens=600))
    assert bounds == [300]
    models = [load_trainable_model(tiny_model, fast(dtype=dtype))[0] for dtype in ("float32", "bfloat16")]
    assert [activation_cost(model) for model in models] == [2, 1]
    config = TrainConfig(per_device_batch_size=8, gradient_accumulation=1, max_batch_tokens=2048)
    assert [pass_budget(config, model) for model in models] == [1024, 2048]
    assert [fit_batch(config, 256, model=model) for model in models] == [(4, 2), (8, 1)]  # DPO/KTO's batches


def test_a_shared_prompt_head_gives_the_same_loss_and_gradients(tiny_model, tmp_path):
    """`share_prompt` runs the rows' common head once per batch and broadcasts its keys and values: rows of
    different lengths (right-padded) get the loss and the LoRA gradients of the plain full-batch forward, and
    the head stops before the first trained token."""
    import torch

    from leap_dspy.train.common import load_trainable_model
    from leap_dspy.train.sft import completion_only_loss, shared_prompt_len

    model, tokenizer = load_trainable_model(tiny_model, fast())
    rows = [{"prompt": _prompt(i) + [{"role": "user", "content": "you see a shelf. " * (1 + 3 * i)}],
             "completion": _answer(f"go to shelf {i}")} for i in range(4)]
    features = sft_features(tokenizer, rows, None)
    width = max(len(ids) for ids in features["input_ids"])
    pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
    inputs = {"input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids in features["input_ids"]]),
              "labels": torch.tensor([pad(labels, -100) for labels in features["labels"]]),
              "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids in features["input_ids"]])}
    shared = shared_prompt_len(inputs)
    first_trained = min(labels.index(next(t for t in labels if t != -100)) for labels in features["labels"])
    assert 16 <= shared < first_trained

    def loss_and_grads(share: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = completion_only_loss(model, inputs, share_prompt=share)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (plain, plain_grads), (split, split_grads) = loss_and_grads(False), loss_and_grads(True)
    assert split == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        assert torch.allclose(split_grads[name], grad, rtol=1e-3, atol=1e-6), name
    assert any(grad.abs().sum() > 0 for grad in plain_grads.values())
    same = train_sft(rows, model=tiny_model, output_dir=tmp_path / "shared", config=fast(max_steps=3))
    apart = train_sft(rows, model=tiny_model, output_dir=tmp_path / "apart", config=fast(max_steps=3,
                                                                                         share_prompt=False))
    assert same.loss_history == pytest.approx(apart.loss_history, rel=1e-4)


def test_fused_lora_gives_peft_outputs_and_gradients(tiny_model, tmp_path):
    """`fused_lora` computes every plain LoRA linear's output and its input's, A's and B's gradients as PEFT's
    operators do (float32: to rounding; a bf16 base under `adapters_in_base_dtype`: as near the exact gradients
    as PEFT's), falls back to PEFT's forward with the adapters disabled (DPO's reference pass), and leaves the
    modules as they were."""
    import copy

    import torch

    from leap_dspy.train.common import adapters_in_base_dtype, load_trainable_model
    from leap_dspy.train.kernels import fused_lora

    def loss_and_grads(model, ids, fused: bool) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
        model.zero_grad()
        with adapters_in_base_dtype(model), fused_lora(model, fused) as patched:
            assert patched == (14 if fused else 0)  # 7 projections x 2 layers
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with model.disable_adapter(), torch.no_grad():
                base = model(input_ids=ids).logits
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, base

    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_trainable_model(tiny_model, fast(dtype=dtype))
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; A's gradient would be zero too
                torch.nn.init.normal_(param, std=0.5)
        ids = torch.tensor([tokenizer.encode("go to shelf 1, take mug 1 from shelf 1")])
        # The exact gradients of these very weights: a float32 copy through PEFT's own operators.
        _, exact, _ = loss_and_grads(copy.deepcopy(model).float(), ids, False)
        (plain, plain_grads, plain_base), (fused, fused_grads, fused_base) = (loss_and_grads(model, ids, False),
                                                                              loss_and_grads(model, ids, True))
        assert fused == pytest.approx(plain, rel=1e-5 if dtype == "float32" else 1e-2), dtype
        assert torch.equal(fused_base, plain_base), dtype
        assert len(fused_grads) == 28 and all(g.abs().sum() > 0 for g in exact.values())
        for name, grad in exact.items():
            error = {"peft": (plain_grads[name] - grad).norm(), "fused": (fused_grads[name] - grad).norm()}
            assert error["fused"] <= 1.5 * error["peft"] + 1e-5 * grad.norm(), (dtype, name, error)
        assert not any("forward" in vars(m) for m in model.modules())

    runs = {flag: train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / str(flag),
                            config=fast(fused_lora=flag, max_steps=3)).loss_history for flag in (False, True)}
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_fused_layers_give_the_models_outputs_and_gradients(tiny_model, tmp_path):
    """`fused_layers` trains RMSNorms and SwiGLU MLPs (with a LoRA or a frozen down projection) to the model's own
    loss and gradients (float32: to rounding; bf16: as near the exact ones as the model's operators), keeps the
    forward of a norm that computes something else and of a norm whose weight trains, and restores every
    module."""
    import copy

    import torch

    from leap_dspy.train.common import adapters_in_base_dtype, load_trainable_model
    from leap_dspy.train.kernels import fused_layers, fused_lora

    class ShiftedRMSNorm(torch.nn.Module):  # Gemma's: scales by 1 + w, so the fused norm would be wrong
        def __init__(self, norm: torch.nn.Module) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (1 + self.weight) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def loss_and_grads(model, ids, fused: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        model.zero_grad()
        with adapters_in_base_dtype(model), fused_lora(model), fused_layers(model, fused) as patched:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, patched

    for dtype, targets in (("float32", None), ("bfloat16", None), ("float32", ["q_proj", "v_proj"])):
        model, tokenizer = load_trainable_model(tiny_model, fast(dtype=dtype, **(
            {"target_modules": targets} if targets else {})))
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; A's gradient would be zero too
                torch.nn.init.normal_(param, std=0.5)
        layers = model.base_model.model.model.layers
        for layer in layers:
            layer.post_attention_layernorm = ShiftedRMSNorm(layer.post_attention_layernorm)
        # Norms that train run their own forward, and are not what decides a class's probe.
        layers[0].input_layernorm.weight.requires_grad_(True)
        layers[0].post_attention_layernorm.weight.requires_grad_(True)
        ids = torch.tensor([tokenizer.encode("go to shelf 1, take mug 1 from shelf 1")])
        _, exact, _ = loss_and_grads(copy.deepcopy(model).float(), ids, False)
        (plain, plain_grads, none), (fused, fused_grads, patched) = (loss_and_grads(model, ids, False),
                                                                     loss_and_grads(model, ids, True))
        assert (none, patched) == (0, 5), dtype  # 2 input norms and the final one; 2 MLPs
        assert fused == pytest.approx(plain, rel=1e-5 if dtype == "float32" else 1e-2), dtype
        assert "model.layers.0.input_layernorm.weight" in "".join(fused_grads)
        assert all(g.abs().sum() > 0 for g in exact.values())
        for name, grad in exact.items():
            error = {"model": (plain_grads[name] - grad).norm(), "fused": (fused_grads[name] - grad).norm()}
            assert error["fused"] <= 1.5 * error["model"] + 1e-5 * grad.norm(), (dtype, targets, name, error)
        assert not any("forward" in vars(m) for m in model.modules())

    runs = {flag: train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / str(flag),
                            config=fast(fused_layers=flag, max_steps=3)).loss_history for flag in (False, True)}
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_the_chunked_head_loss_gives_the_plain_loss_and_gradients(tiny_model, tmp_path, monkeypatch):
    """`linear_cross_entropy` computes the head's summed cross-entropy and the hidden states' gradient a chunk of
    positions at a time: in float32 what the head and `F.cross_entropy` give, over more positions than a chunk
    holds; a head that trains falls back to the plain path; and SFT trains the same losses either way."""
    import torch
    import torch.nn.functional as F

    from leap_dspy.train import kernels
    from leap_dspy.train.common import load_trainable_model

    monkeypatch.setattr(kernels, "LOSS_CHUNK", 3)
    model, _ = load_trainable_model(tiny_model, fast())
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad
    torch.manual_seed(0)
    hidden = torch.randn(10, head.in_features) * 3
    labels = torch.randint(0, head.out_features, (10,))
    results = {}
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        loss = (kernels.linear_cross_entropy(h, head, labels) if fused
                else F.cross_entropy(head(h).float(), labels, reduction="sum"))
        (loss / 7).backward()
        results[fused] = (loss.item(), h.grad)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    assert torch.allclose(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
    assert results[False][1].abs().sum() > 0

    head.weight.requires_grad_(True)  # a trained head: the plain path, its gradient reaching the weight
    kernels.linear_cross_entropy(hidden, head, labels).backward()
    assert head.weight.grad is not None
    runs = {flag: train_sft(sft_rows(), model=tiny_model, output_dir=tmp_path / str(flag),
                            config=fast(fused_loss=flag, max_steps=3)).loss_history for flag in (False, True)}
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_a_launched_trainers_peak_is_its_own_not_the_launching_process():
    """`peak_rss_mb` in a process started by a large one (a compile launching its trainer) reports that process's
    own peak: ru_maxrss would report the launcher's, which the child inherits across fork and exec."""
    import subprocess
    import sys

    from leap_dspy.train.common import peak_rss_mb

    held = bytearray(768 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])  # touch every page: resident, not just reserved
    probe = "from leap_dspy.train.common import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_mb() >= 768
    assert 0 < child < peak_rss_mb() - 512, (child, peak_rss_mb())
    del held


def test_an_adapter_of_another_model_is_named_not_a_shape_traceback(tiny_model, tmp_path):
    """An adapter folder copied from a run on another model: a line naming both, before any engine starts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from leap_dspy.lm.models import ModelNotFound, load_model_with_adapter

    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size = config.hidden_size + 32, config.intermediate_size + 32
    other = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ModelNotFound, match="does not fit .* trained on another model"):
        load_model_with_adapter(tiny_model, tmp_path / "adapter")
