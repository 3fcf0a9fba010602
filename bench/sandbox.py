"""InterCode sandbox and oracle benchmark: prints the attack tables and the oracle success per backend.

python bench/sandbox.py            # attacks, bash oracle on all 24 benchmark tasks, SQL on both backends
python bench/sandbox.py --nl2bash  # also the oracle over the nl2bash train/seen tasks (a few minutes)
"""

from __future__ import annotations

import argparse
import time

from leap_dspy.envs.intercode import InterCodeBash, InterCodeSQL
from leap_dspy.envs.intercode.attacks import run_bash_attacks, run_sql_attacks
from leap_dspy.envs.intercode.reward import sql_reward
from leap_dspy.envs.intercode.sql_env import mysql_ready


def oracle(env, tasks) -> tuple[int, list[str], float]:
    t0, ok, failed = time.monotonic(), 0, []
    for task in tasks:
        env.reset(task)
        obs = None
        while (a := env.oracle_action()) is not None:
            obs = env.step(a)
        if obs is not None and obs.success:
            ok += 1
        else:
            failed.append(f"{task.id} ({obs.reward if obs else None})")
    env.close()
    return ok, failed, time.monotonic() - t0


def table(title: str, rows) -> None:
    print(f"\n### {title}\n")
    print("| attack | contained | wall s | result |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {'yes' if r.contained else 'NO'} | {r.wall_s} | {r.detail.replace('|', '/')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nl2bash", action="store_true")
    args = ap.parse_args()
    table("Bash sandbox attacks (bubblewrap; wall limit 4 s)", run_bash_attacks(wall_s=4.0))
    mysql_reason = mysql_ready()
    table("SQL attacks, SQLite (timeout 2 s)", run_sql_attacks("sqlite", 2.0))
    if mysql_reason is None:
        table("SQL attacks, MariaDB (timeout 2 s)", run_sql_attacks("mysql", 2.0))
    else:
        print(f"\nMariaDB skipped: {mysql_reason}")

    print("\n### Oracle success (gold action, then submit)\n")
    print("| environment | tasks | success | wall s | failures |")
    print("|---|---|---|---|---|")
    bash = InterCodeBash()
    ok, failed, wall = oracle(bash, bash.tasks("unseen"))
    print(f"| bash, intercode-bench (unseen) | {len(bash.tasks('unseen'))} | {ok} | {wall:.1f} | {failed} |")
    if args.nl2bash:
        for split in ("train", "seen"):
            tasks = bash.tasks(split)
            ok, failed, wall = oracle(bash, tasks)
            print(f"| bash, nl2bash ({split}) | {len(tasks)} | {ok} | {wall:.1f} | {failed} |")
    backends = ["sqlite"] + (["mysql"] if mysql_reason is None else [])
    golds: dict[str, dict[str, list]] = {}
    for be in backends:
        env = InterCodeSQL(backend=be)
        for split in ("unseen", "train", "seen"):
            tasks = env.tasks(split)
            ok, failed, wall = oracle(env, tasks)
            print(f"| sql {be}, {split} | {len(tasks)} | {ok} | {wall:.1f} | {failed} |")
        golds[be] = {}
        for t in env.tasks("unseen") + env.tasks("train") + env.tasks("seen"):
            env.reset(t)
            golds[be][t.id] = env._gold()
        env.close()
    if "mysql" in golds:
        a, b = golds["sqlite"], golds["mysql"]
        same = [k for k in a if a[k] == b[k]]
        same_set = [k for k in a if a[k] != b[k] and sorted(map(str, a[k])) == sorted(map(str, b[k]))]
        other = [k for k in a if k not in same and k not in same_set]
        print("\n### SQLite vs MariaDB, gold query results\n")
        print(f"- identical: {len(same)} of {len(a)}")
        print(
            f"- same rows, other order (no ORDER BY, or ties): {len(same_set)}: "
            + ", ".join(f"{k} (cross reward {sql_reward(a[k], b[k])})" for k in same_set)
        )
        print(f"- different: {len(other)}: " + "; ".join(f"{k}: {str(a[k])[:80]} vs {str(b[k])[:80]}" for k in other))


if __name__ == "__main__":
    main()
