"""`LocalEngine`: a DSPy 3.4 engine (`complete(Request) -> Response`) over a local transformers model.

DSPy 3.4 routes a `dspy.LM(..., engine=obj)` call to `obj.complete(request)`; DSPy keeps the cache,
retries, history and callbacks, the engine only turns one canonical request into one response. This engine
renders the request with the tokenizer's chat template (`format_prompt`, shared with training), and either
batches concurrent calls on one worker thread (`batching=True`) or runs each call alone under a lock.

Engines are saved inside programs as `{"class": "leap_dspy.lm.engine:LocalEngine", "state": dump_state()}`;
`load_state` rebuilds through the engine registry, so loading never loads the same model twice.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from leap_dspy.cores import follow_generation_share
from leap_dspy.lm import chat
from leap_dspy.lm.batcher import Batcher
from leap_dspy.lm.gen_types import GenParams, GenResult, GenStats
from leap_dspy.lm.models import DEFAULT_MODEL
from leap_dspy.lm.registry import LoadedModel, get_loaded

_STATE_KEYS = ("model", "adapter", "dtype", "max_batch", "max_new_tokens", "batching", "prefix_cache",
               "batch_wait_s", "device", "no_repeat_ngram", "ngram_repeats", "answer_cache", "draft_tokens",
               "kv_budget_mb")


class LocalEngine:
    """Runs a Hugging Face causal LM (optionally with a merged LoRA adapter) for `dspy.LM(engine=...)`.

    Args:
        model: `DEFAULT_MODEL` (the embedded SmolLM2-135M-Instruct), a model directory, or a hub id in the
            local cache.
        adapter: a PEFT LoRA adapter directory; merged into the weights at load time.
        dtype: "auto" (bf16 on CUDA or on a CPU with AVX512-BF16/AMX, else float32), "float32", "bfloat16".
        max_batch: the largest batch one `generate` call takes.
        max_new_tokens: the default generation length when a request does not set `max_tokens`.
        batching: gather concurrent calls into batches (True) or run each call alone (False).
        prefix_cache: compute the KV cache of a batch's common token prefix once (see `prefill.py`).
        batch_wait_s: how long the worker waits for another request before starting a partial batch.
        device: "cpu", "cuda", ...; None picks CUDA when available.
        no_repeat_ngram: never generate an n-gram of this many tokens more than `ngram_repeats` times in one
            answer (0: off; see `GenParams.no_repeat_ngram`).
        ngram_repeats: how many times one answer may hold such an n-gram (1: never twice).
        answer_cache: how many greedy answers to remember by prompt (0: off). A greedy answer is a function of
            the prompt, and an agent stuck in a loop asks the very same prompt step after step. A remembered
            answer is returned as it was (usage included) without computing it; `remembered` counts them.
        draft_tokens: greedy answers check up to this many drafted tokens a row at each decode step (0: one
            token a step). Drafts come from the prompt and recent answers; in float32 the answers do not change,
            only the number of forward passes (in bfloat16 a several-token step's other matmul shapes can flip
            a rare near-tie, as batching can; see `leap_dspy/lm/draft.py`).
        kv_budget_mb: the most MiB of KV cache one batch may hold; a larger batch runs as several, one after
            another (None: four times the weights' size on a CPU, at least 1 GiB; no bound on a GPU).

    `expected` (attribute, int or None) may be set by a caller that knows how many clients call at once
    (the rollout runner sets it to the number of live environments): a batch then starts as soon as that
    many requests are pending, without waiting `batch_wait_s`.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        adapter: str | os.PathLike | None = None,
        dtype: str = "auto",
        max_batch: int = 64,
        max_new_tokens: int = 128,
        batching: bool = True,
        *,
        prefix_cache: bool = True,
        batch_wait_s: float = 0.05,
        device: str | None = None,
        no_repeat_ngram: int = 0,
        ngram_repeats: int = 1,
        answer_cache: int = 4096,
        draft_tokens: int = 4,
        kv_budget_mb: int | None = None,
    ) -> None:
        self.check_settings({"max_batch": max_batch, "max_new_tokens": max_new_tokens,
                             "draft_tokens": draft_tokens, "kv_budget_mb": kv_budget_mb})
        self.model = str(model)
        self.adapter = str(Path(adapter).expanduser().resolve()) if adapter is not None else None
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_new_tokens = max_new_tokens
        self.batching = batching
        self.prefix_cache = prefix_cache
        self.batch_wait_s = batch_wait_s
        self.device = device
        self.no_repeat_ngram = int(no_repeat_ngram)
        self.ngram_repeats = int(ngram_repeats)
        self.answer_cache = int(answer_cache)
        self.draft_tokens = int(draft_tokens)
        self.kv_budget_mb = int(kv_budget_mb) if kv_budget_mb is not None else None
        self._answers: OrderedDict[tuple, GenResult] = OrderedDict()
        self._answers_lock = threading.Lock()
        self.remembered = 0
        self._expected: int | None = None
        self._loaded: LoadedModel = get_loaded(self.model, self.adapter, dtype, device)
        self._solo_lock = threading.Lock()
        self._batcher = Batcher(
            self._run_batch, max_batch=max_batch, batch_wait_s=batch_wait_s, expected=lambda: self._expected,
            order=tuple,  # prompts' token ids: a batch's layout is the same whichever thread asked first
            name=f"leap-dspy-engine-{Path(self.model).name}",
        )

    @property
    def expected(self) -> int | None:
        return self._expected

    @expected.setter
    def expected(self, value: int | None) -> None:
        self._expected = value
        self._batcher.recheck()  # an episode that ended must not leave the others waiting out the timeout

    # -- prompt formatting (shared with training) ---------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def hf_model(self) -> Any:
        """The loaded (merged) transformers model; shared with other engines of the same settings."""
        return self._loaded.model

    @property
    def generate_seconds(self) -> float:
        """Seconds the model has spent generating so far (shared by the engines of one loaded model)."""
        return self.stats.seconds

    @property
    def stats(self) -> GenStats:
        """The generator's counters: batches, tokens, prefill and decode seconds (shared like the model)."""
        return self._loaded.generator.stats

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the batches the worker ran so far (benchmarks, tests)."""
        return self._batcher.batch_sizes

    def format_prompt(self, messages: list[dict]) -> str:
        """The exact prompt text the model sees for chat `messages` (chat template, generation prompt on).

        Training must build its prompts with this function (or `leap_dspy.lm.chat.format_prompt` with the
        same tokenizer) so that the fine-tuned model sees at inference what it saw in training.
        """
        return chat.format_prompt(self.tokenizer, messages)

    def tokenize(self, text: str) -> list[int]:
        """Prompt token ids (no special tokens added: the template wrote them). Thread-safe."""
        with self._loaded.tokenizer_lock:
            return chat.tokenize_prompt(self.tokenizer, text)

    # -- the engine contract ------------------------------------------------------------------------

    def complete(self, request: Any) -> Any:
        """One `dspy.lm15.Request` -> one `dspy.lm15.Response` (may be called from many threads)."""
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import Message, Response, TextPart, Usage

        validate_request(request)
        if request.tools:
            raise ValueError("LocalEngine does not support tool calling; DSPy's Chat/JSON adapters need none")
        ids = self.tokenize(self.format_prompt(chat.request_to_messages(request)))
        params = self._params(request.config, len(ids))
        result = self._generate(params, ids)
        return Response(
            id=f"local-{uuid.uuid4().hex[:16]}",
            model=self.model,
            message=Message.assistant([TextPart(result.text)]),
            finish_reason=result.finish_reason,
            usage=Usage(input_tokens=result.prompt_tokens, output_tokens=result.output_tokens),
        )

    def stream(self, request: Any) -> Iterator[Any]:
        """No token streaming: the whole response, as the event sequence DSPy expects."""
        from dspy.lm15 import response_to_events

        return iter(response_to_events(self.complete(request)))

    def close(self) -> None:
        """Stop the batching worker (waiting requests fail with `EngineClosed`); a later call restarts it."""
        self._batcher.close()

    # -- saving -------------------------------------------------------------------------------------

    def dump_state(self) -> dict[str, Any]:
        """JSON-serialisable settings; the model itself is found again by name/path when loading."""
        return {key: getattr(self, key) for key in _STATE_KEYS}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LocalEngine:
        """Rebuild (or reuse, through the registry) the engine that `dump_state` described."""
        from leap_dspy.lm.lms import get_engine

        return get_engine(**{key: state[key] for key in _STATE_KEYS if key in state})

    def __reduce__(self) -> tuple:
        # Pickling (multiprocessing, deep copies) carries the settings, never the weights or the threads.
        return (_engine_from_state, (self.dump_state(),))

    def __copy__(self) -> LocalEngine:
        return self

    def __deepcopy__(self, memo: dict) -> LocalEngine:
        return self

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        """Raise ValueError for a setting the engine does not take or a value it refuses: a compile checks its
        `lm` settings here before its run folder records them (a folder's settings cannot be mended later)."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "model", "adapter"}
        if unknown := sorted(set(settings) - known):
            raise ValueError(f"unknown engine setting lm.{unknown[0]}; the engine takes {', '.join(sorted(known))}")
        least = {"max_batch": 1, "max_new_tokens": 1, "draft_tokens": 0, "kv_budget_mb": 1, "no_repeat_ngram": 0,
                 "ngram_repeats": 1, "answer_cache": 0}
        for key, value in settings.items():
            if key in least and value is not None and (not isinstance(value, int) or value < least[key]):
                raise ValueError(f"lm.{key} must be a whole number of at least {least[key]}, not {value!r}")

    def __repr__(self) -> str:
        extra = f", adapter={self.adapter!r}" if self.adapter else ""
        return f"LocalEngine(model={self.model!r}{extra}, dtype={self.dtype!r}, batching={self.batching})"

    # -- internals ----------------------------------------------------------------------------------

    def _params(self, config: Any, prompt_len: int) -> GenParams:
        max_new = config.max_tokens or self.max_new_tokens
        limit = self._loaded.max_positions
        if limit is not None:
            if prompt_len >= limit:
                raise ValueError(f"the prompt has {prompt_len} tokens; {self.model} reads at most {limit}")
            max_new = min(max_new, limit - prompt_len)
        temperature = float(config.temperature or 0.0)
        decoding = config.extensions or {}
        return GenParams(
            max_new_tokens=int(max_new),
            temperature=temperature,
            top_p=config.top_p if temperature else None,
            top_k=config.top_k if temperature else None,
            stop=tuple(config.stop or ()),
            seed=config.seed if temperature else None,
            # a request may carry its own (a compile's student through `leap-dspy serve`, see `lm/pool.py`)
            no_repeat_ngram=int(decoding.get("no_repeat_ngram", self.no_repeat_ngram)),
            ngram_repeats=int(decoding.get("ngram_repeats", self.ngram_repeats)),
            draft_tokens=self.draft_tokens,
            kv_budget=self.kv_budget_mb << 20 if self.kv_budget_mb else None,
        )

    def _generate(self, params: GenParams, ids: list[int]) -> GenResult:
        """The answer to one prompt: remembered when it was asked before (see `answer_cache`), else generated."""
        key = (params, tuple(ids)) if self.answer_cache and not params.temperature else None
        if key is not None:
            with self._answers_lock:
                if key in self._answers:
                    self._answers.move_to_end(key)
                    self.remembered += 1
                    return self._answers[key]
        if self.batching:
            result: GenResult = self._batcher.submit(params, ids)
        else:
            with self._solo_lock:
                result = self._run_batch(params, [ids])[0]
        if key is not None:
            with self._answers_lock:
                self._answers[key] = result
                while len(self._answers) > self.answer_cache:
                    self._answers.popitem(last=False)
        return result

    def _run_batch(self, params: GenParams, prompts: list[list[int]]) -> list[GenResult]:
        follow_generation_share()  # a fine-tune beside this process may hold some of the cores
        return self._loaded.generator.generate(prompts, params, self.prefix_cache)


def _engine_from_state(state: dict[str, Any]) -> LocalEngine:
    return LocalEngine.load_state(state)


class AsyncLocalEngine:
    """The async counterpart DSPy asks for on `acall`/`aforward`: the same engine, run in a thread."""

    def __init__(self, sync: LocalEngine) -> None:
        self.sync = sync

    async def complete(self, request: Any) -> Any:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        from dspy.lm15 import response_to_events

        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Nothing to release: the sync engine owns the worker and is shared."""

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLocalEngine:
        return cls(LocalEngine.load_state(state))

    def __deepcopy__(self, memo: dict) -> AsyncLocalEngine:
        return self


SAFE_ENGINES = {f"{cls.__module__}:{cls.__qualname__}" for cls in (LocalEngine, AsyncLocalEngine)}
"""The engine classes a saved program may name: DSPy imports whatever class a file names."""
ENDPOINT_KEYS = {"api_base", "base_url", "model_list", "api_key"}


def without_lms(state: dict[str, Any]) -> dict[str, Any]:
    """A saved program's state with each predictor's LM left out, for a program that acts with another LM."""
    return {k: {**v, "lm": None} if isinstance(v, dict) and "lm" in v else v for k, v in state.items()}


def unsafe_lm_state(data: Any) -> list[str]:
    """What in a saved program's JSON would import code or send prompts elsewhere: engine classes other than
    leap-dspy's, and endpoint keys."""
    problems: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("engine", "async_engine") and isinstance(value, dict) and value.get("class") not in SAFE_ENGINES:
                problems.append(f"it names the engine class {str(value.get('class'))[:80]!r}")
            elif key in ENDPOINT_KEYS and value:
                problems.append(f"it names an endpoint ({key})")
            else:
                problems += unsafe_lm_state(value)
    elif isinstance(data, list):
        for item in data:
            problems += unsafe_lm_state(item)
    return problems
