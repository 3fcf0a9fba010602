"""`leap-dspy report`: many runs as one page, each stage's mean with a 95% interval over seeds and games.

Runs that differ only in their seed are one *condition*; an interval comes from a two-level bootstrap (seeds,
then the games of each seed), since both vary between reruns. Round − behaviour cloning is paired on the
games both stages played within a seed, which is far tighter than comparing two unpaired intervals; so is one
condition's last round against another's, paired by seed and game.
"""

from __future__ import annotations

import functools
import html
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from leap_dspy.run_config import OPERATIONAL, read_config
from leap_dspy.runs import RunFolder, best_stage, read_metrics
from leap_dspy.store import atomic_write_text, read_json

SEED_KEYS = {"seed", "env.seed", "train.seed", "trainset", "valset", "task_digest", "bc_from", "progress", "iterations",
             "num_threads", "expert_threads", "expert_retries", "evaluate_base", "evaluate_expert",
             "evaluate_snapped", "bc_expert_level", "select"} | (OPERATIONAL - {"train_launcher"})
"""Config keys that do not make another condition: the seed and what it draws, and how a run was operated."""
RESAMPLES = 2000
SELECTED = "selected"
"""The report's stage for each run's best round on the seen tasks (`best_stage`), beside the last."""


@dataclass
class Run:
    """One run folder as a report reads it."""

    path: Path
    config: dict[str, Any]
    outcomes: dict[tuple[str, str], dict[str, dict[str, float]]]  # (stage, split) -> task id -> metric -> value
    sources: dict[str, str] = field(default_factory=dict)  # task id -> Task.source, where episodes.csv has it
    lenient: set[str] = field(default_factory=set)  # stages evaluated with snapping before it was optional
    wall_s: float = 0.0
    peak_mb: float = 0.0
    expert_tokens: float = 0.0

    @property
    def env(self) -> str:
        return str(self.config.get("env", {}).get("name", "?"))


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    seeds: int
    games: int

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        return (f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"
                if self.games else "")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (with config.yaml and metrics) among `paths` and their sub-folders, two levels down."""
    found: list[Path] = []
    for path in paths:
        candidates = [path, *sorted(path.glob("*")), *sorted(path.glob("*/*"))] if path.is_dir() else [path]
        found += [c for c in candidates if (c / "config.yaml").exists() and (c / "metrics.csv").exists()]
    return list(dict.fromkeys(found))


def load_run(path: Path) -> Run:
    folder = RunFolder(path)
    config = read_config(path / "config.yaml")
    run = Run(path, config, {})
    for row in folder.episodes():
        values = {"success": float(row["success"]), "score": 100 * float(row["reward"]),
                  "success_snapped": float(row["success_snapped"]), "score_snapped": 100 * float(row["reward_snapped"])}
        run.outcomes.setdefault((str(row["stage"]), str(row["split"])), {})[str(row["task_id"])] = values
        if row.get("source"):
            run.sources[str(row["task_id"])] = str(row["source"])
        if int(row.get("lenient") or 0):
            run.lenient.add(str(row["stage"]))
    # A published run may keep only metrics.csv: its wall time and expert tokens are there, its memory is not.
    summary = folder.summary_rows()
    stages = list(dict.fromkeys([*folder.stages(), *summary]))
    own = [s for s in stages if s.isdigit() and (s != "0" or not config.get("bc_from"))]
    for stage in stages:
        folder_path = path / (f"iter_{stage}" if stage.isdigit() else stage)
        json_path = folder_path / "metrics.json"
        metrics = read_metrics(json_path) if json_path.exists() else summary[stage]
        run.wall_s += float(metrics.get("wall_s") or 0) if stage in own else 0.0
        run.expert_tokens += float(metrics.get("expert_tokens") or 0) if stage in own or not stage.isdigit() else 0.0
        run.peak_mb = max(run.peak_mb, float(metrics.get("peak_rss_mb") or 0))
        if (folder_path / "train.json").exists():  # a launched fine-tune ran beside the compile's own memory
            trained = read_json(folder_path / "train.json")
            both = float(trained.get("peak_rss_mb") or 0) + float(trained.get("host_rss_mb") or 0)
            run.peak_mb = max(run.peak_mb, both)
    _add_selected(run)
    return run


def _add_selected(run: Run) -> None:
    """The `SELECTED` stage: the round `best_stage` picks on the seen tasks (what `select: best` returns),
    computed from the episodes so that runs compiled before the setting existed are judged by the same rule."""
    seen = {stage: (float(np.mean([v["success"] for v in games.values()])),
                    float(np.mean([v["score"] for v in games.values()])))
            for (stage, split), games in run.outcomes.items() if split == "seen" and stage.isdigit() and games}
    best = best_stage(seen)
    if best is None or len(seen) < 2:
        return
    for (stage, split), games in list(run.outcomes.items()):
        if stage == best:
            run.outcomes[(SELECTED, split)] = games
    if best in run.lenient:
        run.lenient.add(SELECTED)


def conditions(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs grouped by (environment, what else varies between the runs of that environment)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for env in dict.fromkeys(r.env for r in runs):
        mine = [r for r in runs if r.env == env]
        flat = [_flatten(r.config) for r in mine]
        keys = sorted({k for f in flat for k in f} - SEED_KEYS)
        # A key only some runs record (a setting added by a later version) does not split them by itself.
        varying = _independent([k for k in keys if len({repr(f[k]) for f in flat if k in f}) > 1], flat)
        for run, values in zip(mine, flat, strict=True):
            label = ", ".join(f"{k.removeprefix('env.')}={_short(values.get(k))}" for k in varying) or "all runs"
            groups.setdefault((env, label), []).append(run)
    return groups


def bootstrap(per_seed: list[np.ndarray], seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The mean over seeds of each seed's mean over games, with a 95% percentile interval from resampling
    seeds and then, within each, games. Each call draws from its own generator, so the same numbers get the
    same interval wherever a page shows them, and a page showing them again reuses it."""
    games = tuple(np.asarray(a, dtype=float).tobytes() for a in per_seed if len(a))
    return _bootstrap(games, seed, resamples)


@functools.lru_cache(maxsize=4096)
def _bootstrap(games: tuple[bytes, ...], seed: int, resamples: int) -> Estimate:
    rng = np.random.default_rng(seed)
    per_seed = [np.frombuffer(g) for g in games]
    if not per_seed:
        return Estimate(0.0, 0.0, 0.0, 0, 0)
    point = float(np.mean([a.mean() for a in per_seed]))
    # np.mean's own arithmetic (a pairwise sum, then one division) without its per-call overhead, which is most
    # of a report's time; the draws are the same calls in the same order, so the intervals are unchanged.
    sizes, reduce, draws = [len(a) for a in per_seed], np.add.reduce, np.empty(resamples)
    for i in range(resamples):
        seeds = rng.integers(len(per_seed), size=len(per_seed))
        means = np.array([reduce(per_seed[s][rng.integers(sizes[s], size=sizes[s])]) / sizes[s] for s in seeds])
        draws[i] = reduce(means) / len(means)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(point, float(low), float(high), len(per_seed), sum(len(a) for a in per_seed))


def estimate(runs: list[Run], stage: str, split: str, metric: str, seed: int = 0) -> Estimate:
    return bootstrap([np.array([v[metric] for v in r.outcomes.get((stage, split), {}).values()]) for r in runs],
                     seed)


def paired(runs: list[Run], stage: str, split: str, metric: str, seed: int = 0,
           against: str = "0") -> Estimate:
    """`stage` − `against` on the games both played, per seed."""
    return _differences([(run.outcomes.get((stage, split), {}), run.outcomes.get((against, split), {}))
                         for run in runs], metric, seed)


def _differences(pairs: list[tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]], metric: str,
                 seed: int) -> Estimate:
    """The bootstrap of per-game differences, one (games, games played against) pair per seed."""
    return bootstrap([np.array([now[t][metric] - then[t][metric] for t in now if t in then])
                      for now, then in pairs], seed)


def stages_of(runs: list[Run]) -> list[str]:
    names = {stage for r in runs for stage, _ in r.outcomes}
    return ([s for s in ("base", "expert") if s in names] + sorted((s for s in names if s.isdigit()), key=int)
            + [s for s in (SELECTED,) if s in names])


def stage_name(stage: str) -> str:
    return {"0": "BC", SELECTED: "best round on seen"}.get(stage, stage if not stage.isdigit() else f"round {stage}")


def is_gain(stage: str) -> bool:
    """Whether a stage's row pairs it with behaviour cloning: every round after it, and the selected one."""
    return stage == SELECTED or (stage.isdigit() and stage != "0")


def has_scores(runs: list[Run]) -> bool:
    return any(any(v["score"] not in (0.0, 100.0) for v in games.values()) for r in runs for games in
               r.outcomes.values())


def write_report(paths: list[Path], out: Path, title: str = "LEAP results", seed: int = 0) -> Path:
    """report.md and report.html (with their plots) in `out`; returns the Markdown page."""
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        raise ValueError(f"no run folders with metrics under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    groups = conditions(runs)
    sections: list[tuple[str, list[tuple[list[str], list[list[str]]]], list[str]]] = []
    for env in dict.fromkeys(env for env, _ in groups):
        mine = {label: rs for (e, label), rs in groups.items() if e == env}
        tables = [_stage_table(env, label, rs, seed) for label, rs in mine.items()]
        tables += [table for label, rs in mine.items() if (table := _source_table(label, rs, seed))]
        tables.append(_cost_table(mine))
        sections.append((env, tables, _plots(env, mine, out, seed)))
    if len(groups) > 1:
        between = _between_table(groups, seed)
        sections.insert(0, ("summary", [_summary_table(groups, seed)] + ([between] if between[1] else []), []))
    markdown = _markdown(title, sections, runs)
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", _html(title, sections, runs))
    return out / "report.md"


def _stage_table(env: str, label: str, runs: list[Run], seed: int
                 ) -> tuple[list[str], list[list[str]]]:
    scores = has_scores(runs)
    snapped = any(r.lenient or any(v["success"] != v["success_snapped"] for games in r.outcomes.values()
                                   for v in games.values()) for r in runs)
    metrics = ["success"] + (["success_snapped"] if snapped else []) + (["score"] if scores else [])
    seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    gains = ["success"] + (["score"] if scores else [])  # a score moves with partial credit; success may not
    head = [f"{label} ({seeds})", *(f"unseen {m.replace('_', ' ')}" for m in metrics),
            "seen success", *(f"unseen Δ vs BC ({m})" for m in gains)]
    rows = []
    for stage in stages_of(runs):
        cells = [stage_name(stage)]
        for metric in metrics:
            scale, digits = (1.0, 1) if metric == "score" else (1.0, 2)
            value = estimate(runs, stage, "unseen", metric, seed)
            lenient = metric == "success" and any(stage in r.lenient for r in runs)
            cells.append("(snapped only)" if lenient else value.text(scale, digits))
        cells.append(estimate(runs, stage, "seen", "success", seed).text())
        for metric in gains:
            cells.append(paired(runs, stage, "unseen", metric, seed).text(1.0, 1 if metric == "score" else 2)
                         if is_gain(stage) else "")
        rows.append(cells)
    return head, rows


def _summary_table(groups: dict[tuple[str, str], list[Run]], seed: int
                   ) -> tuple[list[str], list[list[str]]]:
    """One line per condition: behaviour cloning against the last round (and the best round on seen) on unseen
    tasks, in the score where the environment grades partial answers, else in success: the page's answer before
    its details."""
    head = ["environment", "condition", "seeds", "unseen tasks", "metric", "BC", "last round", "last round − BC",
            "best round on seen − BC"]
    rows = []
    for (env, label), runs in groups.items():
        final = last_round(runs)
        if "0" not in stages_of(runs) or final is None:
            continue
        metric, digits = ("score", 1) if has_scores(runs) else ("success", 2)
        bc, last = estimate(runs, "0", "unseen", metric, seed), estimate(runs, final, "unseen", metric, seed)
        rows.append([env, label, str(len(runs)), str(bc.games // max(bc.seeds, 1)), metric, bc.text(1.0, digits),
                     f"{last.text(1.0, digits)} ({stage_name(final)})",
                     paired(runs, final, "unseen", metric, seed).text(1.0, digits),
                     paired(runs, SELECTED, "unseen", metric, seed).text(1.0, digits)])
    return head, rows


def last_round(runs: list[Run]) -> str | None:
    """The latest LEAP round any of `runs` evaluated (not behaviour cloning), or None."""
    rounds = [s for s in stages_of(runs) if s.isdigit() and s != "0"]
    return rounds[-1] if rounds else None


def between(first: list[Run], second: list[Run], metric: str, seed: int = 0) -> Estimate:
    """`first`'s last round − `second`'s on the unseen games both played, per seed they share: whether one
    condition beats another, which two overlapping intervals cannot say."""
    mine, theirs = last_round(first), last_round(second)
    by_seed = {r.config.get("seed"): r for r in second}
    pairs = [(run.outcomes.get((mine, "unseen"), {}), other.outcomes.get((theirs, "unseen"), {}))
             for run in first if (other := by_seed.get(run.config.get("seed"))) is not None]
    return _differences(pairs if mine and theirs else [], metric, seed)


def _between_table(groups: dict[tuple[str, str], list[Run]], seed: int
                   ) -> tuple[list[str], list[list[str]]]:
    """Each pair of one environment's conditions, last round against last round, paired by seed and game."""
    head = ["environment", "condition", "against", "seeds", "metric", "last round, condition − against"]
    rows = []
    for ((env, label), runs), ((other_env, other), theirs) in itertools.combinations(groups.items(), 2):
        if env != other_env:
            continue
        metric, digits = ("score", 1) if has_scores(runs + theirs) else ("success", 2)
        difference = between(runs, theirs, metric, seed)
        if difference.games:
            rows.append([env, label, other, str(difference.seeds), metric, difference.text(1.0, digits)])
    return head, rows


def _source_table(label: str, runs: list[Run], seed: int
                  ) -> tuple[list[str], list[list[str]]] | None:
    """Unseen success (and score) for each source of its tasks, where they mix several (a benchmark's shipped
    tasks beside generated ones): a mean over all of them can hide that one source does not move."""
    unseen = {t for r in runs for (_, split), games in r.outcomes.items() if split == "unseen" for t in games}
    sources = sorted({r.sources[t] for r in runs for t in unseen if t in r.sources})
    if len(sources) < 2:
        return None
    metrics = ["success"] + (["score"] if has_scores(runs) else [])
    head, rows = [f"{label}: unseen by source"], [[stage_name(stage)] for stage in stages_of(runs)]
    for source in sources:
        mine = [_only(r, source) for r in runs]
        games = max(len(g) for r in mine for (_, split), g in r.outcomes.items() if split == "unseen")
        for metric in metrics:
            digits = 1 if metric == "score" else 2
            head += [f"{source} {metric} ({games})", f"{source} Δ vs BC ({metric})"]
            for stage, row in zip(stages_of(runs), rows, strict=True):
                gain = is_gain(stage)
                row += [estimate(mine, stage, "unseen", metric, seed).text(1.0, digits),
                        paired(mine, stage, "unseen", metric, seed).text(1.0, digits) if gain else ""]
    return head, rows


def _only(run: Run, source: str) -> Run:
    """`run` with its unseen games narrowed to the tasks of one source."""
    outcomes = {key: ({t: v for t, v in games.items() if run.sources.get(t) == source} if key[1] == "unseen"
                      else games) for key, games in run.outcomes.items()}
    return replace(run, outcomes=outcomes)


def _cost_table(groups: dict[str, list[Run]]) -> tuple[list[str], list[list[str]]]:
    # each process's high-water mark, the trainer's and the compile's beside it added: an upper bound
    head = ["condition", "runs", "minutes per run", "peak memory (GiB, at most)", "expert tokens per run"]
    rows = [[label, str(len(rs)), f"{np.mean([r.wall_s for r in rs]) / 60:.1f}",
             f"{peak / 1024:.1f}" if (peak := max(r.peak_mb for r in rs)) else "not recorded",
             f"{np.mean([r.expert_tokens for r in rs]):.0f}"]
            for label, rs in groups.items()]
    return head, rows


def _plots(env: str, groups: dict[str, list[Run]], out: Path, seed: int) -> list[str]:
    """Learning curves with 95% bands (base and expert as reference lines), and each round's paired gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "score" if any(has_scores(rs) for rs in groups.values()) else "success"
    fig, (curve, gain) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (label, runs) in enumerate(groups.items()):
        colour = f"C{i}"
        rounds = [s for s in stages_of(runs) if s.isdigit()]
        points = [estimate(runs, s, "unseen", metric, seed) for s in rounds]
        xs = [int(s) for s in rounds]
        curve.plot(xs, [p.mean for p in points], marker="o", color=colour, label=label)
        curve.fill_between(xs, [p.low for p in points], [p.high for p in points], color=colour, alpha=0.2)
        for ref, style in (("base", ":"), ("expert", "--")):
            if any((ref, "unseen") in r.outcomes for r in runs):
                curve.axhline(estimate(runs, ref, "unseen", metric, seed).mean, color=colour, ls=style, alpha=0.5)
        deltas = [paired(runs, s, "unseen", metric, seed) for s in rounds[1:]]
        offsets = [int(s) + 0.08 * (i - (len(groups) - 1) / 2) for s in rounds[1:]]
        gain.errorbar(offsets, [d.mean for d in deltas], yerr=[[d.mean - d.low for d in deltas],
                      [d.high - d.mean for d in deltas]], fmt="o", color=colour, capsize=4, label=label)
    ticks = sorted({int(s) for rs in groups.values() for s in stages_of(rs) if s.isdigit()})
    curve.set_xticks(ticks, [stage_name(str(t)) for t in ticks])
    gain.set_xticks(ticks[1:], [stage_name(str(t)) for t in ticks[1:]])
    curve.set(title=f"unseen {metric}, 95% band (dotted: base, dashed: expert)", ylabel=metric)
    gain.axhline(0, color="grey", lw=1)
    gain.set(title="round − BC on the same games, 95% interval", ylabel=f"Δ {metric}")
    fig.suptitle(env)
    for ax in (curve, gain):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{_slug(env)}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def _markdown(title: str, sections: list[Any], runs: list[Run]) -> str:
    lines = [f"# {title}", "", _PREAMBLE, ""]
    for env, tables, plots in sections:
        lines += [f"## {env}", ""] + ([f"![{env}]({p})" for p in plots] + [""] if plots else [])
        for head, rows in tables:
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["Runs: " + ", ".join(f"`{r.path.name}`" for r in runs), ""]
    return "\n".join(lines)


def _html(title: str, sections: list[Any], runs: list[Run]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1><p>{html.escape(_PREAMBLE)}</p>"]
    for env, tables, plots in sections:
        parts.append(f"<h2>{html.escape(env)}</h2>" + "".join(f'<img src="{p}" width="900">' for p in plots))
        for head, rows in tables:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    parts.append("<p>Runs: " + ", ".join(html.escape(str(r.path)) for r in runs) + "</p>")
    style = ("body{font-family:system-ui,sans-serif;margin:2rem;max-width:75rem;color:#222}table{border-collapse:"
             "collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
             "th{background:#f3f3f3}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{style}'
            f"</style></head><body>{''.join(parts)}</body></html>")


_PREAMBLE = ("Each cell is the mean over seeds of each seed's mean over games, with a 95% bootstrap interval "
             "(seeds, then games) in brackets. Success is strict: an action runs as the student wrote it; "
             "'snapped' is success had near misses been run as the closest admissible action. "
             "Δ vs BC pairs each round with behaviour cloning on the same games of the same seed. "
             "'Best round on seen' takes, in each seed, the stage with the highest seen success (then score, ties "
             "to the later): what `--select best` returns, judged on unseen tasks it was not chosen by.")


DERIVED = ("iteration_lr", "preference_anchor", "demonstrator", "lm.", "train.")
"""Keys that usually follow from another (a dpo run's learning rate, its anchor share): named last, and left
out of a condition's label when the keys before them already tell the runs apart."""


def _independent(keys: list[str], flat: list[dict[str, Any]]) -> list[str]:
    """The keys that tell the runs apart, each left out where the ones before already do; every environment
    option is kept, since config.yaml does not say which of two that vary together was set (a room size) and
    which followed from it (its step limit)."""
    kept = [k for k in keys if k.startswith("env.")]
    for key in sorted((k for k in keys if k not in kept), key=lambda k: k.startswith(DERIVED)):
        groups: dict[str, set[str]] = {}
        for values in flat:
            groups.setdefault(repr([values.get(k) for k in kept]), set()).add(repr(values.get(key)))
        if not kept or any(len(v) > 1 for v in groups.values()):
            kept.append(key)
    return kept


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("expert", "demonstrator"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _short(value: Any) -> str:
    if isinstance(value, dict):  # an expert: its model or class is what tells two apart
        return str(value.get("model") or value.get("name"))
    return str(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
