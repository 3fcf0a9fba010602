"""What `leap-dspy serve` serves and under which name: a run folder's model and final adapter, the name
clients ask for, and the `vllm serve` command for the same, with the same loopback-only-without-a-key rule."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def served_label(model: str, adapter: str | os.PathLike | None = None) -> str:
    """The default served name: the model's label (a folder's last part), `+<adapter folder>` with an adapter.
    The same label `local_lm` gives its `dspy.LM`."""
    from leap_dspy.lm.lms import model_label

    label = model_label(str(model))
    return label + (f"+{Path(adapter).resolve().name}" if adapter is not None else "")


def resolve_target(target: str | os.PathLike | None, adapter: str | os.PathLike | None = None
                   ) -> tuple[str, str | None, dict[str, Any]]:
    """`(model, adapter, engine_kwargs)` for `leap-dspy serve TARGET`.

    A run folder (it has `config.yaml`) gives its `model`, the adapter its compile returned (`compiled.json`,
    else the newest finished `iter_<k>/adapter`) unless `adapter` is given, and its student's engine settings
    (`lm`); anything else is a model name or folder, served with `adapter` if given.
    """
    from leap_dspy.lm.models import DEFAULT_MODEL
    from leap_dspy.run_config import read_config
    from leap_dspy.runs import RunFolder, check_adapter

    if target is not None and (Path(target) / "config.yaml").is_file():
        run = RunFolder(target)
        config = read_config(run.config_path)
        model = config.get("model")
        if not model:
            raise ValueError(f"{run.config_path} names no model")
        if adapter is None:
            last = run.compiled_adapter()
            if last is None:
                raise ValueError(f"{run.path} has no finished adapter yet (no iter_<k>/adapter/adapter_config.json)")
            adapter = check_adapter(last)
        engine_kwargs = dict(config.get("lm") or {})
        return str(model), str(adapter), engine_kwargs
    return str(target or DEFAULT_MODEL), (str(adapter) if adapter is not None else None), {}


def vllm_command(model: str, adapter: str | None, host: str, port: int, served_name: str | None = None,
                 max_lora_rank: int | None = None, api_key: str | None = None) -> list[str]:
    """The `vllm serve` command line serving `model` (+ `adapter` as a LoRA module) under the same names
    as the transformers server, with the same rule: no API key, loopback only (vLLM reads the key from
    VLLM_API_KEY, which keeps it out of the process list)."""
    from leap_dspy.lm.models import resolve_model

    if not api_key and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without an API key; pass --api-key or bind 127.0.0.1")
    if api_key:
        os.environ["VLLM_API_KEY"] = api_key
    weights = str(resolve_model(model))
    command = ["vllm", "serve", weights, "--host", host, "--port", str(port)]
    if adapter is None:
        command += ["--served-model-name", served_name or served_label(model)]
        return command
    command += ["--served-model-name", served_label(model), "--enable-lora",
                "--lora-modules", f"{served_name or served_label(model, adapter)}={Path(adapter).resolve()}"]
    rank = max_lora_rank or _adapter_rank(adapter)
    if rank:
        command += ["--max-lora-rank", str(rank)]
    return command


def _adapter_rank(adapter: str | os.PathLike) -> int | None:
    try:
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r")
    except (OSError, ValueError):
        return None
    if not isinstance(rank, int):
        return None
    # vLLM accepts a fixed set of ranks; the smallest that holds the adapter.
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), None)
