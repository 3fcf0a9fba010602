"""Environment steps per second with episodes stepped in this process's threads against Ray actors.

    python bench/ray_envs.py [--env alfworld] [--episodes 32] [--threads 16] [--workers 2 4]

The scripted expert plays (no language model), so the environment is all the work: with threads, ALFWorld's
Python engine runs behind one interpreter lock; with Ray, each actor is a process of its own. Prints a table:
mode, workers, episodes, steps, wall seconds, env-steps/s, ratio to threads.
"""

from __future__ import annotations

import argparse
import time

from leap_dspy.envs import make_env
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.rollout import attach_env, expert_policy, run_parallel


def play(env, source, tasks, threads: int) -> tuple[int, float]:
    expert = attach_env(OracleExpert(), env)
    policy = expert_policy(expert, Student(), env, level=max(env.privilege_levels))
    started = time.perf_counter()
    episodes = run_parallel(policy, source, tasks, num_threads=threads)
    return sum(len(e.steps) for e in episodes), time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="alfworld")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    env = make_env(args.env)
    tasks = env.tasks("train")[: args.episodes]
    play(env, env, tasks[:2], 2)  # warm caches (ALFWorld's generated games) before timing anything
    steps, wall = play(env, env, tasks, args.threads)
    rows = [("threads", args.threads, steps, wall)]
    import ray

    from leap_dspy.remote import RayEpisodes

    for workers in args.workers:
        pool = RayEpisodes(env, "local", workers)
        play(env, pool, tasks[:workers], workers)  # start the actors outside the timing
        steps_r, wall_r = play(env, pool, tasks, args.threads)
        rows.append(("ray actors", workers, steps_r, wall_r))
        pool.shutdown()
    ray.shutdown()
    base = rows[0][2] / rows[0][3]
    print(f"{args.env}, {len(tasks)} episodes of the scripted expert, {args.threads} threads")
    print("| mode | workers | steps | wall (s) | env-steps/s | ratio to threads |")
    print("|---|---|---|---|---|---|")
    for mode, workers, n, w in rows:
        print(f"| {mode} | {workers} | {n} | {w:.1f} | {n / w:.1f} | {n / w / base:.2f} |")


if __name__ == "__main__":
    main()
