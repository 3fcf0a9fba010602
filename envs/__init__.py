"""Text environments: the protocol and a registry by the names the CLI uses, plus your own by import path."""

from __future__ import annotations

import importlib
import os
import sys
import typing
from typing import Any

import pydantic

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
    """The class of a registered environment (`alfworld`), or of your own given as `module:Class`
    (`examples.keybox:KeyBox`, see `import_env`)."""
    if name in ENVIRONMENTS:
        module_name, _, attr = ENVIRONMENTS[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    if ":" in name:
        return import_env(name)
    raise UnknownEnvironment(f"unknown environment {name!r}; choose one of: {', '.join(ENVIRONMENTS)}, "
                             "or give your own as module:Class (e.g. examples.keybox:KeyBox)")


def import_env(path: str) -> type[TextEnv]:
    """A `TextEnv` subclass from its import path `module:Class`.

    The module is looked up as `python -m` would: the current directory comes first on `sys.path` (the
    `leap-dspy` script alone would not look there), so `examples.keybox:KeyBox` is `examples/keybox.py` under
    the directory the command runs in. A path that does not import, or names no TextEnv, is an
    `UnknownEnvironment` saying which.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownEnvironment(f"environment {path!r}: an import path is module:Class, e.g. examples.keybox:KeyBox")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownEnvironment(f"environment {path!r}: cannot import {module_name!r} (looked in {cwd} and "
                                 f"the installed packages): {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise UnknownEnvironment(f"environment {path!r}: module {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, TextEnv)):
        raise UnknownEnvironment(f"environment {path!r}: {attr} is not a TextEnv subclass "
                                 "(see leap_dspy.envs.base.TextEnv)")
    return cls


def env_spec(env: TextEnv) -> str:
    """The name that rebuilds `env`'s class through `env_class`: its registered name, else its import path."""
    registered = ENVIRONMENTS.get(env.name)
    if registered and env_class(env.name) is type(env):
        return env.name
    return f"{type(env).__module__}:{type(env).__qualname__}"


def make_env(name: str, **kwargs: Any) -> TextEnv:
    cls = env_class(name)
    check_options(cls, kwargs)
    return cls(**kwargs)


def check_options(cls: type[TextEnv], options: dict[str, Any]) -> None:
    """Check constructor options against the constructor's annotations, so that `--set num_boxes=three` names
    the option and the type it takes instead of failing somewhere inside the constructor."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve at run time: the constructor alone judges
        return
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None or (str in (hint, *typing.get_args(hint)) and isinstance(value, int | float)):
            continue  # `--set name=7` means the text
        try:
            adapter = pydantic.TypeAdapter(hint)
        except Exception:  # a type pydantic cannot check: the constructor alone judges
            continue
        try:
            adapter.validate_python(value)
        except pydantic.ValidationError:
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ValueError(f"{key}={value!r}: {cls.__name__} takes {kind}") from None


__all__ = ["ENVIRONMENTS", "TextEnv", "UnknownEnvironment", "check_options", "env_class", "env_spec", "import_env",
           "make_env"]
