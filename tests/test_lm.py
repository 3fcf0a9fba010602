"""The local LM backend on the real embedded model (SmolLM2-135M), kept short: few tokens per call.

Equality of batched and batch-1 greedy outputs is checked in float32: in bfloat16 a batch's matmuls have
other shapes than a single row's, so rare near-ties between two tokens can flip (seen on 1 of 4 prompts).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from collections import Counter

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

dspy = pytest.importorskip("dspy")

from dspy.lm15 import Config, Message, Request  # noqa: E402

from leap_dspy.lm import LocalEngine, get_engine, local_lm, vllm_lm  # noqa: E402
from leap_dspy.lm.batcher import Batcher, EngineClosed  # noqa: E402
from leap_dspy.lm.chat import format_prompt, request_to_messages, split_for_training  # noqa: E402

SYSTEM = (
    "Your input fields are:\n1. `question` (str)\nYour output fields are:\n1. `answer` (str)\n"
    "All interactions will be structured in the following way.\n\n[[ ## question ## ]]\n{question}\n\n"
    "[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\nIn adhering to this structure, your objective is: "
    "Answer the question."
)
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?", "What is 2+2?"]


def request(question: str, max_tokens: int = 10, **config) -> Request:
    return Request(
        model="local",
        system=SYSTEM,
        messages=(Message.user(f"[[ ## question ## ]]\n{question}"),),
        config=Config(max_tokens=max_tokens, temperature=0.0, **config),
    )


class QA(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


@pytest.fixture(scope="module")
def lm():
    return local_lm(max_new_tokens=16)


# -- batching machinery, no model ---------------------------------------------------------------------


def test_batcher_gathers_expected_clients_and_routes_errors():
    seen: list[tuple] = []

    def run(key, payloads):
        seen.append((key, list(payloads)))
        if "boom" in payloads:
            raise RuntimeError("generation failed")
        return [f"{key}:{p}" for p in payloads]

    batcher = Batcher(run, max_batch=8, batch_wait_s=5.0, expected=lambda: 3)
    results: dict[int, object] = {}

    def call(i, key, payload):
        try:
            results[i] = batcher.submit(key, payload)
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    start = time.monotonic()
    threads = [threading.Thread(target=call, args=(i, "a", str(i))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 4, "expected=3 should start the batch without waiting batch_wait_s"
    assert sorted(results.values()) == ["a:0", "a:1", "a:2"] and batcher.batch_sizes == [3]

    results.clear()
    threads = [threading.Thread(target=call, args=(i, "b", "boom" if i == 0 else "x")) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(isinstance(r, RuntimeError) and "generation failed" in str(r) for r in results.values())

    batcher.expected = lambda: None
    batcher.batch_wait_s = 0.01
    assert batcher.submit(("k", 1), "y") == "('k', 1):y"  # the worker survived the failure
    batcher.close()
    assert batcher.submit("c", "z") == "c:z"  # and restarts after close
    batcher.close()


def test_a_batch_starts_once_fewer_clients_are_expected():
    """Two clients wait, a third was expected but its episode ended: lowering `expected` starts their batch at
    once instead of after the expected clients' wait."""
    expected = {"n": 3}
    batcher = Batcher(lambda key, payloads: list(payloads), max_batch=8, batch_wait_s=5.0,
                      expected=lambda: expected["n"], expected_wait_s=30.0)
    results: list[str] = []
    threads = [threading.Thread(target=lambda p=p: results.append(batcher.submit("k", p))) for p in "ab"]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert results == []
    start = time.monotonic()
    expected["n"] = 2
    batcher.recheck()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["a", "b"] and time.monotonic() - start < 2 and batcher.batch_sizes == [2]
    batcher.close()


def test_batcher_orders_a_batch_by_its_requests_not_by_arrival():
    seen: list[list[str]] = []

    def run(key, payloads):
        seen.append(list(payloads))
        return [p.upper() for p in payloads]

    batcher = Batcher(run, max_batch=8, batch_wait_s=5.0, expected=lambda: 4, order=lambda p: p)
    results: dict[str, str] = {}

    def call(payload, delay):
        time.sleep(delay)
        results[payload] = batcher.submit("k", payload)

    threads = [threading.Thread(target=call, args=(p, d)) for p, d in (("d", 0), ("b", 0.05), ("c", 0.1), ("a", 0.15))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    assert seen == [["a", "b", "c", "d"]]  # arrival was d, b, c, a
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}  # each caller still gets its own answer


def test_two_jobs_at_once_tell_their_engine_every_live_episode(tiny_model: str) -> None:
    """Two rollouts playing through one engine at once (from two threads of a user's script, or a bench's): its
    `expected` counts the live episodes of both, so a batch starts once all of them have asked rather than once
    either job's have, and waits out no timer for the other's."""
    import sys
    from pathlib import Path

    from leap_dspy.programs import Student
    from leap_dspy.rollout import run_parallel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.keybox import KeyBox

    env, student = KeyBox(num_boxes=3, num_train=4, num_seen=1, num_unseen=1, max_steps=8), Student()
    student.set_lm(local_lm(tiny_model, max_new_tokens=8))
    engine, everyone = student.step.lm.engine, threading.Barrier(5)
    seen: list[int | None] = []

    def play(episode_env: KeyBox, task: object) -> object:
        everyone.wait(timeout=60)  # 3 + 2 episodes live at once
        seen.append(engine.expected)
        everyone.wait(timeout=60)
        return student.run(episode_env, task, max_steps=1)

    jobs = [threading.Thread(target=run_parallel, args=(play, env, tasks), kwargs={"program": student})
            for tasks in (env.tasks("train")[:3], env.tasks("train")[3:] + env.tasks("seen"))]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert seen == [5] * 5
    assert engine.expected is None


def test_batcher_close_fails_waiting_requests():
    release = threading.Event()

    def slow(key, payloads):
        release.wait(5)
        return list(payloads)

    batcher = Batcher(slow, max_batch=1, batch_wait_s=0.0)
    errors: list[BaseException] = []

    def call(p):
        try:
            batcher.submit("k", p)
        except EngineClosed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # one in flight, two waiting
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.1)
    release.set()
    closer.join(10)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 2


def test_request_to_messages_and_training_split():
    req = request("hi")
    messages = request_to_messages(req)
    assert messages == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": req.messages[0].text}]
    engine = get_engine(max_new_tokens=16)
    prompt = engine.format_prompt(messages)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt == format_prompt(engine.tokenizer, messages)
    p, completion = split_for_training(engine.tokenizer, [*messages, {"role": "assistant", "content": "Paris"}])
    assert p == prompt and completion.startswith("Paris<|im_end|>")


# -- the real model -------------------------------------------------------------------------------------


def test_predict_through_chat_adapter(lm):
    predict = dspy.Predict(QA)
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        try:
            prediction = predict(question="What is the capital of France?")
        except dspy.utils.exceptions.AdapterParseError as exc:  # an untrained 135M model rarely keeps the format
            assert "answer" in str(exc)
        else:
            assert isinstance(prediction.answer, str)
    response = lm.history[-1]["response"]
    assert response.usage.input_tokens > 50 and 0 < response.usage.output_tokens <= 16


@pytest.mark.parametrize("stop", [(), (".",)], ids=["no-stop", "stop-prunes-rows"])
def test_batched_equals_batch1_greedy_float32(stop):
    solo = get_engine(dtype="float32", batching=False, prefix_cache=False, max_new_tokens=12)
    batched = get_engine(dtype="float32", batching=True, prefix_cache=True, max_new_tokens=12, batch_wait_s=2.0)
    assert solo.hf_model is batched.hf_model  # one model in memory for both engines
    reference = [solo.complete(request(q, 12, stop=stop)) for q in QUESTIONS]

    batched.expected = len(QUESTIONS)
    out: dict[int, object] = {}

    def call(i: int) -> None:
        out[i] = batched.complete(request(QUESTIONS[i], 12, stop=stop))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert batched.batch_sizes[-1] == len(QUESTIONS)
    if stop:  # rows finish at different steps, so finished rows were dropped mid-batch
        assert len({r.usage.output_tokens for r in reference}) > 1
    for i, ref in enumerate(reference):
        assert out[i].text == ref.text
        assert out[i].usage.output_tokens == ref.usage.output_tokens
        assert out[i].usage.input_tokens == ref.usage.input_tokens


def test_stop_strings_trim_and_stop_early():
    engine = get_engine(max_new_tokens=16)
    free = engine.complete(request(QUESTIONS[1], 16))
    text = free.text
    assert len(text) > 8
    stop = text[4:7]
    stopped = engine.complete(request(QUESTIONS[1], 16, stop=(stop, "\u2603never")))
    assert stopped.text == text[: text.find(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.usage.output_tokens < free.usage.output_tokens


def test_lm_call_with_stop_kwarg(lm):
    outputs = lm("Count from one to ten in words, separated by commas.", stop=[","], max_tokens=12)
    assert "," not in outputs[0]


def test_adapter_directory_loads(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from leap_dspy.lm.models import DEFAULT_MODEL, load_model

    base = load_model(DEFAULT_MODEL, "float32", "cpu")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    del base

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = local_lm(adapter=tmp_path / "adapter", max_new_tokens=6)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    engine = lm._engine_spec
    assert engine.adapter == str((tmp_path / "adapter").resolve())
    assert engine.hf_model is not get_engine(max_new_tokens=16).hf_model
    assert not any("lora" in name for name, _ in engine.hf_model.named_parameters())  # merged
    response = engine.complete(request(QUESTIONS[0], 6))
    assert response.usage.output_tokens >= 1
    assert local_lm(adapter=tmp_path / "adapter", max_new_tokens=6)._engine_spec is engine
    engine.close()


def test_save_and_load_predict_round_trip(tmp_path, lm):
    predict = dspy.Predict(QA)
    predict.lm = lm
    path = tmp_path / "program.json"
    predict.save(str(path))

    loaded = dspy.Predict(QA)
    loaded.load(str(path), allow_unsafe_lm_state=True)
    assert isinstance(loaded.lm._engine_spec, LocalEngine)
    assert loaded.lm._engine_spec is lm._engine_spec  # the registry hands back the same engine
    assert loaded.lm.kwargs["temperature"] == 0.0 and loaded.lm.kwargs["max_tokens"] == 16
    with pytest.raises(ValueError, match="allow_unsafe_lm_state"):
        dspy.Predict(QA).load(str(path))


@pytest.mark.parametrize("batching", [True, False])
def test_generation_errors_reach_the_caller(monkeypatch, batching):
    engine = LocalEngine(max_new_tokens=4, batching=batching)  # its own engine: the patch stays local

    def boom(*args, **kwargs):
        raise RuntimeError("simulated generation failure")

    if batching:
        monkeypatch.setattr(engine._batcher, "run_batch", boom)
    else:
        monkeypatch.setattr(engine, "_loaded", type(engine._loaded)(**{**vars(engine._loaded)}))
        monkeypatch.setattr(engine._loaded, "generator", type("G", (), {"generate": staticmethod(boom)})())
    lm = dspy.LM("local/broken", engine=engine, cache=False, num_retries=0, max_tokens=4)
    errors: list[BaseException] = []

    def call():
        try:
            lm("hello")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert len(errors) == 3
    assert all("simulated generation failure" in f"{e} {e.__cause__}" for e in errors)
    engine.close()


def test_async_call(lm):
    import asyncio

    outputs = asyncio.run(lm.acall("Say hi.", max_tokens=4))
    assert isinstance(outputs[0], str)


def test_vllm_lm_constructs():
    lm = vllm_lm("HuggingFaceTB/SmolLM2-135M-Instruct", adapter="/runs/x/iter_1/adapter",
                 base_url="http://localhost:8000/v1")
    assert lm.model == "hosted_vllm/adapter"
    assert lm.kwargs["temperature"] == 0.0


def test_no_repeat_ngram_breaks_greedy_loops(tiny_model):
    """A random tiny model loops at once under greedy decoding; with the guard no n-gram of its answer
    repeats, and the prompt (which the answer may quote) does not count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leap_dspy.lm.generate import Generator, GenParams

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator = Generator(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer, prefix_cache=False)
    prompts = [tokenizer.encode("go to shelf 1, go to shelf 2, go to shelf 3"), tokenizer.encode("hello there")]

    def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
        return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]

    free = generator.generate(prompts, GenParams(max_new_tokens=40, ignore_eos=True), False)
    assert any(len(set(ngrams(r.token_ids, 3))) < len(ngrams(r.token_ids, 3)) for r in free)  # it loops
    guarded = generator.generate(prompts, GenParams(max_new_tokens=40, ignore_eos=True, no_repeat_ngram=3), False)
    for result in guarded:
        assert len(result.token_ids) == 40
        assert len(set(ngrams(result.token_ids, 3))) == len(ngrams(result.token_ids, 3))
    twice = generator.generate(prompts, GenParams(max_new_tokens=40, ignore_eos=True, no_repeat_ngram=3,
                                                  ngram_repeats=2), False)
    counts = [Counter(ngrams(r.token_ids, 3)) for r in twice]
    assert max(max(c.values()) for c in counts) == 2  # said twice, as an INTERSECT's halves are; never three times
    engine = LocalEngine(tiny_model, no_repeat_ngram=3, ngram_repeats=2)
    assert (engine.dump_state()["no_repeat_ngram"], engine.dump_state()["ngram_repeats"]) == (3, 2)


def test_length_chunked_prefill_matches_one_padded_prefill():
    """Rows prefilled in chunks of similar length (or of a bounded size) and then laid side by side give the same
    greedy answers, in float32, as one padded prefill of the whole batch: the rows' order is restored and pads
    stay masked."""
    from leap_dspy.lm.generate import Generator, GenParams
    from leap_dspy.lm.models import DEFAULT_MODEL, load_model, load_tokenizer
    from leap_dspy.lm.prefill import length_chunks

    assert length_chunks([30, 10, 31, 11], 0.1) == [[1, 3], [0, 2]]
    assert length_chunks([30, 10], 1.0) == [[0, 1]]
    assert length_chunks([10, 10, 10, 10, 10], 1.0, max_tokens=20) == [[0, 1], [2, 3], [4]]
    assert length_chunks([30, 10, 31, 11], 0.1, max_tokens=40) == [[1, 3], [0], [2]]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="float32")
    head = tokenizer.encode(SYSTEM)
    prompts = [head + tokenizer.encode(q * k) for q, k in zip(QUESTIONS, (3, 1, 2, 1), strict=True)]
    params = GenParams(max_new_tokens=8)
    one = Generator(model, tokenizer, prefill_waste=1.0).generate(prompts, params)
    chunked = Generator(model, tokenizer, prefill_waste=0.0)
    split = chunked.generate(prompts, params)
    assert chunked.stats.extra["prefill_chunks"] == len({len(p) for p in prompts}) > 1  # no padding at all
    assert [r.token_ids for r in split] == [r.token_ids for r in one]
    bounded = Generator(model, tokenizer, prefill_waste=1.0, prefill_tokens=1)  # a row a chunk
    assert [r.token_ids for r in bounded.generate(prompts, params)] == [r.token_ids for r in one]
    assert bounded.stats.extra["prefill_chunks"] == len(prompts)


def test_a_batchs_kv_cache_is_held_once(monkeypatch):
    """The buffers chunked prefill fills are the ones decoding appends to, with room for the answer, and
    dropping finished rows replaces each layer's buffer rather than keeping it beside the selected copy: a
    batch's cache is never held twice (it was, and that was most of an evaluation's peak memory)."""
    import torch

    from leap_dspy.lm import prefill as prefill_module
    from leap_dspy.lm.generate import Generator, GenParams
    from leap_dspy.lm.models import DEFAULT_MODEL, load_model, load_tokenizer

    filled: list = []
    empty_layers = prefill_module.empty_layers
    monkeypatch.setattr(prefill_module, "empty_layers", lambda *a: filled.append(empty_layers(*a)) or filled[-1])
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="float32")
    head = tokenizer.encode(SYSTEM)
    prompts = [head + tokenizer.encode(q * k) for q, k in zip(QUESTIONS, (3, 1, 2, 1), strict=True)]
    generator = Generator(model, tokenizer, prefill_waste=0.0)
    with torch.inference_mode():
        start = generator.prefill(prompts, 5, True)
    layers = start.cache.layers
    assert len(filled) == 1
    for layer, (keys, values) in zip(layers, filled[0], strict=True):
        assert layer._k is keys and layer._v is values
        assert layer.keys.data_ptr() == keys.data_ptr() and keys.shape[-2] == layer.get_seq_length() + 5
    before = [layer.keys[[0, 2]].clone() for layer in layers]
    start.cache.batch_select_indices(torch.tensor([0, 2]))
    for layer, rows in zip(layers, before, strict=True):
        assert layer._k.shape[0] == 2 and layer.keys.data_ptr() == layer._k.data_ptr()
        assert torch.equal(layer.keys, rows)
        buffer = layer._k
        layer.update(torch.zeros(2, rows.shape[1], 5, rows.shape[-1]), torch.zeros(2, rows.shape[1], 5, rows.shape[-1]))
        assert layer._k is buffer  # the answer's room came along
    # Drafted steps outgrow the room (a rejected draft's columns stay) and finished rows are dropped: the adopted
    # buffers grow and shrink, and the answers are those of one padded prefill decoded a token a step.
    plain = Generator(model, tokenizer, prefill_waste=1.0).generate(prompts, GenParams(max_new_tokens=40))
    chunked = Generator(model, tokenizer, prefill_waste=0.0, draft_budget=1024)
    drafted = chunked.generate(prompts, GenParams(max_new_tokens=40, draft_tokens=4))
    assert [r.token_ids for r in drafted] == [r.token_ids for r in plain]
    assert len(filled) == 2 and chunked.stats.extra["drafted"] > chunked.stats.extra["kept"]


def test_a_call_past_the_kv_budget_runs_as_several_batches_with_the_same_answers():
    """A call whose KV cache would pass `kv_budget` runs as batches of similar length one after another: the
    same greedy answers in float32, in the callers' order."""
    from leap_dspy.lm.generate import Generator, GenParams, kv_bytes_per_token
    from leap_dspy.lm.models import DEFAULT_MODEL, load_model, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="float32")
    config = model.config
    assert kv_bytes_per_token(config, model.dtype) == (
        config.num_hidden_layers * 2 * config.num_key_value_heads * 64 * 4)  # SmolLM2-135M: 30 x 2 x 3 x 64 floats
    head = tokenizer.encode(SYSTEM)
    prompts = [head + tokenizer.encode(q * k) for q, k in zip(QUESTIONS, (3, 1, 2, 1), strict=True)]
    params = GenParams(max_new_tokens=8)
    whole = Generator(model, tokenizer)
    one = whole.generate(prompts, params)
    assert "kv_groups" not in whole.stats.extra
    two_rows = 2 * (max(len(p) for p in prompts) + 9) * kv_bytes_per_token(config, model.dtype)
    split = Generator(model, tokenizer, kv_budget=two_rows)
    assert split.groups([len(p) for p in prompts], 9, two_rows) == [[1, 3], [2, 0]]
    assert split.groups([len(p) for p in prompts], 9, 1) == [[1], [3], [2], [0]]  # a row past it: alone
    assert [r.token_ids for r in split.generate(prompts, params)] == [r.token_ids for r in one]
    assert split.stats.extra["kv_groups"] == 2 and split.stats.batches == 1
    assert split.stats.peak_kv_bytes == max(  # the larger group's reservation, answer room included
        2 * (max(len(prompts[i]) for i in g) + 9) * kv_bytes_per_token(config, model.dtype) for g in ([1, 3], [2, 0]))
    assert whole.stats.peak_kv_bytes == 4 * (max(len(p) for p in prompts) + 9) * kv_bytes_per_token(config, model.dtype)
    asked = dataclasses.replace(params, kv_budget=two_rows)  # a call's own budget (an engine's kv_budget_mb)
    assert [r.token_ids for r in whole.generate(prompts, asked)] == [r.token_ids for r in one]
    assert whole.stats.extra["kv_groups"] == 2
    engine = LocalEngine(kv_budget_mb=3)
    assert engine._params(request(QUESTIONS[0]).config, 10).kv_budget == 3 << 20
    assert engine.dump_state()["kv_budget_mb"] == 3
    with pytest.raises(ValueError, match="kv_budget_mb"):
        LocalEngine(kv_budget_mb=0)


def test_a_greedy_answer_asked_again_is_remembered_not_recomputed():
    """An agent in a loop sends the same prompt step after step: the engine answers it again from memory, the
    same response, without a batch; sampled answers and `answer_cache=0` are always generated."""
    engine = get_engine(max_new_tokens=8, answer_cache=2)
    first = engine.complete(request(QUESTIONS[0], 8))
    batches = len(engine.batch_sizes)
    again = engine.complete(request(QUESTIONS[0], 8))
    assert again.text == first.text and again.usage == first.usage
    assert len(engine.batch_sizes) == batches and engine.remembered == 1
    sampled = Request(model="local", system=SYSTEM, messages=request(QUESTIONS[0]).messages,
                      config=Config(max_tokens=8, temperature=0.7, seed=1))
    engine.complete(sampled)  # sampled: never remembered
    for question in QUESTIONS[1:3]:  # two newer answers push the oldest out of a 2-answer memory
        engine.complete(request(question, 8))
    engine.complete(request(QUESTIONS[0], 8))
    assert len(engine.batch_sizes) == batches + 4 and engine.remembered == 1
    off = get_engine(max_new_tokens=8, answer_cache=0)
    off.complete(request(QUESTIONS[0], 8))
    off.complete(request(QUESTIONS[0], 8))
    assert off.remembered == 0 and len(off.batch_sizes) == 2


def test_drafts_come_from_the_row_first_then_from_recent_answers():
    from leap_dspy.lm.draft import Drafter

    drafter = Drafter(sizes=(2,))
    row = drafter.row([5, 6, 7, 8, 1, 5, 6])
    assert drafter.draft(row, 3) == [7, 8, 1]  # what followed "5 6" in the row's own context
    assert drafter.draft(row, 0) == []
    other = drafter.row([9, 3, 4])
    assert drafter.draft(other, 3) == []
    drafter.remember([3, 4, 11, 12, 13, 14])
    assert drafter.draft(other, 3) == [11, 12, 13]  # what followed "3 4" in a recent answer
    row.extend([7])
    assert drafter.draft(row, 2) == [8, 1]  # the answer so far counts as context too
    assert drafter.row([1, 2, 3, 1, 2, 4, 1, 2]).follows(2, 2) == [4, 1]  # the latest occurrence wins
    assert drafter.draft(drafter.row([7, 7, 9]), 2) == []  # nothing seen follows "7 9"


@pytest.mark.parametrize("guard", [0, 3], ids=["plain", "no-repeat-ngram"])
def test_drafted_greedy_answers_equal_one_token_steps_float32(guard):
    """Checking drafted tokens changes how many forward passes an answer takes, never the answer: the same tokens,
    finish reasons and eos, with stop strings, the token budget and the repetition guard, while some drafts are
    kept and some rejected (their cache columns masked out)."""
    from leap_dspy.lm.generate import Generator, GenParams
    from leap_dspy.lm.kernels import prepare_for_inference
    from leap_dspy.lm.models import DEFAULT_MODEL, load_model, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL, dtype="float32")
    prepare_for_inference(model)
    prompts = [tokenizer.encode(format_prompt(tokenizer, [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"[[ ## question ## ]]\n{q} Repeat the question, then answer it."}]))
        for q in QUESTIONS]
    generator = Generator(model, tokenizer, draft_budget=1024)  # drafts at every batch size
    for stop, budget in (((), 40), (("\n\n[[ ## completed",), 60)):
        params = GenParams(max_new_tokens=budget, stop=stop, no_repeat_ngram=guard, ngram_repeats=2)
        plain = generator.generate(prompts, params)
        generator.stats.extra.clear()
        drafted = generator.generate(prompts, dataclasses.replace(params, draft_tokens=4))
        assert [r.token_ids for r in drafted] == [r.token_ids for r in plain]
        assert [(r.finish_reason, r.ended_with_eos) for r in drafted] == [
            (r.finish_reason, r.ended_with_eos) for r in plain]
        extra = generator.stats.extra
        assert 0 < extra["kept"] < extra["drafted"]
        assert extra["decode_steps"] < max(len(r.token_ids) for r in plain)
    assert LocalEngine(draft_tokens=0).dump_state()["draft_tokens"] == 0
    with pytest.raises(ValueError, match="draft_tokens"):
        LocalEngine(draft_tokens=-1)


def test_weight_first_linears_compute_what_f_linear_computes(tiny_model, monkeypatch):
    """Weight-first linears change the order of a matmul, not its result: a model's logits stay within float32
    rounding, biases and 3-d inputs included, and a prefill's many rows keep `F.linear` exactly. Whether a model
    gets them is timed; here the timing is taken as won, or lost."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from leap_dspy.lm import kernels

    layer = torch.nn.Linear(48, 96)
    x = torch.randn(3, 5, 48)
    with torch.inference_mode():
        assert torch.allclose(kernels._weight_first(layer, x), layer(x), atol=1e-5)
        many = torch.randn(kernels.WEIGHT_FIRST_ROWS + 1, 48)
        assert torch.equal(kernels._weight_first(layer, many), F.linear(many, layer.weight, layer.bias))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    monkeypatch.setattr(kernels, "_FASTER", {})
    head = torch.randn(256, 48)
    decided = kernels._weight_first_is_faster(head, rows=(2, 8), reps=2)  # timed on this machine: either way
    remembered = dict(kernels._FASTER)
    assert remembered == {((256, 48), torch.float32): decided}  # once per kind of model and process
    monkeypatch.setattr(kernels, "_weight_first_is_faster", lambda weight: False)
    assert not kernels.use_weight_first_linears(model)
    monkeypatch.setattr(kernels, "_weight_first_is_faster", lambda weight: True)
    assert kernels.use_weight_first_linears(model)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)
    assert not kernels.use_weight_first_linears(plain.to(torch.bfloat16))  # float32 on a CPU only


@pytest.mark.parametrize("queries", [2, 5, 17], ids=["drafted-step", "longer-draft", "prefill-chunk"])
def test_grouped_attention_computes_what_sdpa_computes_over_repeated_heads(queries):
    """A few queries a row are packed by key/value head and a prefill chunk's run with grouped heads: either way
    each query head gets what sdpa gives it over its own copy of the key/value head, under a padding and causal
    mask, boolean or additive."""
    import types

    import torch
    import torch.nn.functional as F

    from leap_dspy.lm import kernels

    batch, heads, kv_heads, length, dim = 3, 6, 2, 23, 8
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(batch, heads, queries, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    visible = torch.ones(batch, 1, queries, length, dtype=torch.bool).tril(length - queries)
    visible[1, ..., :4] = False  # a row's left padding
    additive = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                              attn_mask=visible).transpose(1, 2)
    for mask in (visible, additive):
        out, _ = kernels._grouped_sdpa(module, query, key, value, mask, scaling=dim**-0.5)
        assert out.shape == (batch, queries, heads, dim)
        assert torch.allclose(out, expected, atol=1e-5)


def test_an_unpadded_one_token_step_is_packed_and_computes_what_sdpa_computes(monkeypatch):
    """A one-token step with no row padded has no mask; it is packed by key/value head (torch's grouped-query
    kernel is several times slower on a CPU in bf16) and gives every head what sdpa gives it."""
    import types

    import torch
    import torch.nn.functional as F

    from leap_dspy.lm import kernels

    batch, heads, kv_heads, length, dim = 3, 6, 2, 23, 8
    module = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads, length, dim)
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append((q.shape, kw)) or
                        sdpa(q, *a, **kw))
    out, _ = kernels._grouped_sdpa(module, query, key, value, None, scaling=dim**-0.5)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    assert calls == [((batch, kv_heads, 3, dim), {"attn_mask": None, "dropout_p": 0.0, "scale": dim**-0.5})]
