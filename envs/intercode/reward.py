"""InterCode's reward functions, re-implemented from the upstream definitions (no scikit-learn, no scipy).

Bash (upstream `BashEnv.get_reward`): 0.01 + three parts of 0.33 each, every part rounded to 2 decimals:
  1. file-system diff: 0.33 * (1 - erf(#changes only the gold made + #changes only the agent made)),
     where a change is (path, A|M|D) against the task's initial file system;
  2. file contents: of the changes both made that add or modify a file, the fraction whose content (md5 and
     exec bit) is the same as the gold's, times 0.33 (0.33 when there are none);
  3. output: 0.33 * TF-IDF cosine similarity of the agent's last output and the gold command's output
     (exact match when neither has a word token, as upstream's fallback).
  Success is a total of 1.0.
SQL (upstream `SqlEnv.get_reward`): intersection over union of the two result multisets of stringified rows,
scaled by Kendall's tau-b between the orders of the shared rows when tau is defined; 1.0 when both are empty,
0.0 when the agent's last observation is an error, not rows.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def tfidf_similarity(a: str, b: str) -> float:
    """Cosine similarity of the two documents' TF-IDF vectors, as sklearn's TfidfVectorizer defaults."""
    ta, tb = Counter(_TOKEN.findall(a.lower())), Counter(_TOKEN.findall(b.lower()))
    vocab = set(ta) | set(tb)
    if not vocab:
        return 1.0 if a == b else 0.0
    idf = {t: math.log(3 / (1 + (t in ta) + (t in tb))) + 1 for t in vocab}
    va = {t: c * idf[t] for t, c in ta.items()}
    vb = {t: c * idf[t] for t, c in tb.items()}
    na = math.sqrt(sum(v * v for v in va.values()))
    nb = math.sqrt(sum(v * v for v in vb.values()))
    if na == 0 or nb == 0:
        return 0.0
    return sum(v * vb.get(t, 0.0) for t, v in va.items()) / (na * nb)


def fs_changes(initial: dict[str, str], final: dict[str, str]) -> dict[str, str]:
    """path -> A (added), M (modified) or D (deleted)."""
    changes = {p: "A" for p in final if p not in initial}
    changes.update({p: "M" for p in final if p in initial and final[p] != initial[p]})
    changes.update({p: "D" for p in initial if p not in final})
    return changes


def bash_reward(
    initial: dict[str, str],
    agent_fs: dict[str, str],
    gold_fs: dict[str, str],
    agent_output: str,
    gold_output: str,
) -> tuple[float, dict[str, Any]]:
    diff_agent = set(fs_changes(initial, agent_fs).items())
    diff_gold = set(fs_changes(initial, gold_fs).items())
    miss, extra = diff_gold - diff_agent, diff_agent - diff_gold
    p1 = round(0.33 * (1 - math.erf(len(miss) + len(extra))), 2)
    same = [p for p, kind in diff_agent & diff_gold if kind in ("A", "M")]
    p2 = 0.33
    if same:
        correct = sum(agent_fs.get(p) == gold_fs.get(p) for p in same)
        p2 = round(0.33 * correct / len(same), 2)
    sim = tfidf_similarity(agent_output, gold_output)
    p3 = round(0.33 * sim, 2)
    reward = round(0.01 + p1 + p2 + p3, 2)
    info = {
        "file_diff": p1,
        "file_changes": p2,
        "answer_similarity": p3,
        "diff_miss": sorted(f"{k} {p}" for p, k in miss),
        "diff_extra": sorted(f"{k} {p}" for p, k in extra),
    }
    return reward, info


def normalize_value(v: Any) -> Any:
    """One value as both backends should agree on it (MariaDB's Decimal and datetime, SQLite's float/str)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float | Decimal):
        f = float(v)
        if math.isfinite(f) and f == int(f) and abs(f) < 2**53:
            return int(f)
        return round(f, 4)
    if isinstance(v, datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, date | time):
        return v.isoformat()
    if isinstance(v, timedelta):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8", errors="replace")
    return str(v)


def normalize_rows(rows: list[tuple]) -> list[tuple]:
    return [tuple(normalize_value(v) for v in row) for row in rows]


def _kendall_tau_b(x: list[str], y: list[str]) -> float:
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = (x[i] > x[j]) - (x[i] < x[j])
            dy = (y[i] > y[j]) - (y[i] < y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return float("nan") if denom == 0 else (concordant - discordant) / denom


def _intersect_items(items: list[str], counts: Counter) -> list[str]:
    out, left = [], counts.copy()
    for it in items:
        if left.get(it, 0) > 0:
            left[it] -= 1
            out.append(it)
    return out


def sql_reward(agent: list[tuple] | str | None, gold: list[tuple] | str | None) -> float:
    if not isinstance(agent, list) or not isinstance(gold, list):
        return 0.0
    la = [str(r) for r in agent]
    lg = [str(r) for r in gold]
    ca, cg = Counter(la), Counter(lg)
    inter = ca & cg
    union = ca | cg
    if not union:
        return 1.0
    reward = sum(inter.values()) / sum(union.values())
    if inter:
        tau = _kendall_tau_b(_intersect_items(la, inter), _intersect_items(lg, inter))
        if not math.isnan(tau):
            reward = round(tau * reward, 2)
    return reward
