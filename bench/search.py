"""WebShop offline benchmark: catalog build time, FTS5 search latency, oracle vs random-click agent.

    python bench/search.py [--num-products 10000] [--queries 2000] [--seed 0] [--fresh]

Builds the full default catalog (in a temporary cache folder with --fresh, to time a cold build), times
searches (instructions of every split, the oracle's queries, and random two-to-four word queries), and runs
the oracle and a random-click agent on `unseen`. Prints tables: latency p50/p95/max, WebShop score
(mean reward x 100) and success rate (reward = 1).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

from leap_dspy.envs.webshop import DEFAULT_NUM_PRODUCTS, WebShop
from leap_dspy.envs.webshop.agents import evaluate, oracle_policy, random_click_policy
from leap_dspy.envs.webshop.catalog import SEARCH_RETURN_N


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _queries(env: WebShop, count: int, seed: int) -> list[str]:
    """The tasks' instructions, the oracle's queries on unseen goals, then random title words up to `count`."""
    rng = random.Random(seed)
    queries = [t.instruction for split in ("train", "seen", "unseen") for t in env.tasks(split)]
    for t in env.tasks("unseen"):
        env.reset(t)
        queries.append(env.oracle_query())
    words = sorted({w for p in env.catalog.products[:2000] for w in p["title"].lower().split()})
    while len(queries) < count:
        queries.append(" ".join(rng.sample(words, rng.randint(2, 4))))
    queries = queries[:count]
    rng.shuffle(queries)
    return queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-products", type=int, default=DEFAULT_NUM_PRODUCTS)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="build into a temporary cache (times a cold build)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.fresh else None
    t0 = time.perf_counter()
    env = WebShop(num_products=args.num_products, seed=args.seed, cache_dir=tmp.name if tmp else None)
    build_s = time.perf_counter() - t0
    catalog = env.catalog
    assert catalog is not None

    queries = _queries(env, args.queries, args.seed)
    for q in queries[:20]:  # warm the page cache
        catalog.search(q)
    latencies, hits = [], []
    for q in queries:
        t = time.perf_counter()
        hits.append(len(catalog.search(q)))
        latencies.append((time.perf_counter() - t) * 1000)

    unseen = env.tasks("unseen")
    t = time.perf_counter()
    oracle = evaluate(env, unseen, oracle_policy)
    oracle_s = time.perf_counter() - t
    t = time.perf_counter()
    rand = evaluate(env, unseen, random_click_policy(args.seed))
    rand_s = time.perf_counter() - t

    print(
        f"WebShop offline catalog: {len(catalog.products)} products, seed {args.seed}, "
        f"{'cold build' if args.fresh else 'open (cached or built)'} {build_s:.2f} s, "
        f"file {catalog.path.name}"
    )
    print()
    print(f"| search (FTS5 bm25, top {SEARCH_RETURN_N}) | queries | p50 ms | p95 ms | max ms | mean hits |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(catalog.products)} products | {len(latencies)} | {statistics.median(latencies):.2f} | "
        f"{percentile(latencies, 95):.2f} | {max(latencies):.2f} | {statistics.mean(hits):.1f} |"
    )
    print()
    print(
        "| agent (unseen split) | episodes | score (mean reward x 100) | success rate | mean steps | wall s |"
    )
    print("|---|---|---|---|---|---|")
    for name, res, wall in (("oracle", oracle, oracle_s), ("random click", rand, rand_s)):
        print(
            f"| {name} | {res['episodes']} | {res['score']:.1f} | {res['success_rate']:.2f} | "
            f"{res['mean_steps']:.1f} | {wall:.2f} |"
        )
    env.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
