"""Text environments: the protocol and a registry by the names the CLI uses."""

from __future__ import annotations

import importlib
from typing import Any

from leap_dspy.envs.base import TextEnv

ENVIRONMENTS: dict[str, str] = {
    "alfworld": "leap_dspy.envs.alfworld:ALFWorld",
    "webshop": "leap_dspy.envs.webshop:WebShop",
    "intercode-bash": "leap_dspy.envs.intercode:InterCodeBash",
    "intercode-sql": "leap_dspy.envs.intercode:InterCodeSQL",
}


class UnknownEnvironment(ValueError):
    pass


def env_class(name: str) -> type[TextEnv]:
    if name not in ENVIRONMENTS:
        raise UnknownEnvironment(f"unknown environment {name!r}; choose one of: {', '.join(ENVIRONMENTS)}")
    module_name, _, attr = ENVIRONMENTS[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def make_env(name: str, **kwargs: Any) -> TextEnv:
    return env_class(name)(**kwargs)


__all__ = ["ENVIRONMENTS", "TextEnv", "UnknownEnvironment", "env_class", "make_env"]
