"""Memoised parsing inside TextWorld's PDDL engine.

TextWorld parses text with TatSu where the text never changes: every step derives the command template of
each applicable action (about twenty) by parsing the template string again and parses each grammar rule's
condition again, and every reset translates the same PDDL problem to SAS twice more with Fast Downward (the
game's load already did). That repeated parsing is most of a reset's and a step's time, and in batched
rollouts every environment's time is spent under one interpreter lock (and `TEXTWORLD_LOCK`) beside the
model's generation loop. Each of these functions depends on its text arguments alone, so each result is
computed once and every caller gets a deep copy of it (TextWorld mutates what it gets back: it sets each
symbol's context).
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable
from typing import Any

_installed = False


def _memoised(parse: Callable[..., Any], maxsize: int) -> Callable[..., Any]:
    @functools.lru_cache(maxsize=maxsize)
    def parsed(args: tuple[Any, ...], kwargs: tuple[tuple[str, Any], ...]) -> Any:
        return parse(*args, **dict(kwargs))

    @functools.wraps(parse)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return copy.deepcopy(parsed(args, tuple(sorted(kwargs.items()))))

    wrapper.cache_info = parsed.cache_info  # type: ignore[attr-defined]
    return wrapper


def _keeping_argv(translate: Callable[..., Any]) -> Callable[..., Any]:
    """Fast Downward's translation sets `sys.argv` for its option parser and leaves it so: a script that read
    its own arguments after an ALFWorld reset would get `['translate.py', 'domain', 'task']`."""

    @functools.wraps(translate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        argv = sys.argv
        try:
            return translate(*args, **kwargs)
        finally:
            sys.argv = argv

    return wrapper


def install() -> None:
    """Replace TextWorld's three parse functions and Fast Downward's translation with memoised ones (once per
    process)."""
    global _installed
    if _installed:
        return
    import fast_downward
    import textworld.logic
    from textworld.envs.pddl import logic, textgen

    # Templates and rule conditions are short and shared by all games; a game's grammar and its PDDL translation
    # are large and its own (kept for a few games: loading a game translates it, and each reset again).
    textgen._parse_and_convert = _memoised(textgen._parse_and_convert, maxsize=4096)
    textworld.logic._parse_and_convert = _memoised(textworld.logic._parse_and_convert, maxsize=4096)
    logic._parse_and_convert = _memoised(logic._parse_and_convert, maxsize=16)
    fast_downward.pddl2sas = _memoised(_keeping_argv(fast_downward.pddl2sas), maxsize=16)
    _installed = True
