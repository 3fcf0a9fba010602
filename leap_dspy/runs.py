"""The run folder: what a compile leaves behind for a person and for a resume.

```
config.yaml                      everything needed to rerun
base/ expert/                    the untrained student and the expert, evaluated for reference
iter_0/ (behaviour cloning), iter_1/, ...
    trajectories.jsonl  corrections.jsonl  adapter/  eval.jsonl  eval_snapped.jsonl  metrics.json
metrics.csv  episodes.csv  report.html  learning_curve.png
```
"""

from __future__ import annotations

import csv
import fcntl
import html
import io
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from leap_dspy.progress import console
from leap_dspy.store import JsonlLog, RunFileError, atomic_write_json, atomic_write_text, read_json
from leap_dspy.types import Correction

BASE_COLUMNS = ["iteration", "seen_success", "unseen_success"]
SCORE_COLUMNS = ["seen_score", "unseen_score"]
SNAPPED_COLUMNS = ["seen_success_snapped", "unseen_success_snapped"]
TAIL_COLUMNS = ["train_examples", "corrections_changed", "parse_errors", "expert_calls", "expert_tokens",
                "expert_cost_usd", "train_s", "eval_s", "overlap_s", "wall_s"]
ROW_ORDER = ["base", "expert"]
COMPILED = "compiled.json"
"""Which stage's adapter compile returned, and by which rule."""
EPISODE_COLUMNS = ["stage", "task_id", "split", "source", "success", "reward", "steps", "success_snapped",
                   "reward_snapped", "lenient", "actions"]
"""`episodes.csv`, one row per evaluated episode: what a report's intervals over games are computed from.
`*_snapped` is the outcome with near misses snapped (the strict one where the episode had none); `lenient` 1
marks a stage evaluated with snapping before evaluation was strict, whose `success` is the snapped one; `source`
the task's (`Task.source`); `actions` the strict episode's actions (a JSON list, each clipped): a published run
still shows what was done."""


class RunInUse(RunFileError):
    """Another process writes into the run folder: a compile, or a fine-tune that a killed compile launched."""


_HELD: dict[Path, int] = {}
LOCK_FILE = ".lock"


def hold(run: RunFolder) -> int:
    """Lock `run` for this process's lifetime and return the lock's descriptor, which the fine-tunes it launches
    inherit (`Placement.launch_fine_tune`): two compiles of one folder, or a resume beside a killed compile's
    still-running fine-tune, would write the same files."""
    path = run.path.resolve()
    if path in _HELD:
        return _HELD[path]
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunInUse(f"{run.path} is in use: another compile runs in it, or a fine-tune launched by a compile "
                       "that was killed is still running (it ends by itself, or stop it: `pkill -f "
                       f"'leap_dspy.train.launch.*{path}'`); then run again") from None
    _HELD[path] = fd
    return fd


def held(path: Path) -> int | None:
    """The lock descriptor of the run folder `path` if this process holds it (see `hold`)."""
    return _HELD.get(path.resolve())


def read_metrics(path: Path) -> dict[str, Any]:
    """A stage's metrics.json: `read_json`'s checks, and the stage it names."""
    metrics = read_json(path)
    if "iteration" not in metrics:
        raise RunFileError(f"{path} names no stage (no iteration); delete it and run again to produce it anew")
    return metrics


def check_adapter(path: str | Path) -> Path:
    """`path` if it holds a readable LoRA adapter (its config, and its weights' header), else a `RunFileError`
    that names it: a corrupt adapter would otherwise fail deep inside the engine, at the first generation."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    weights = path / "adapter_model.safetensors"
    try:
        if not isinstance(json.loads((path / "adapter_config.json").read_text()), dict):
            raise ValueError("adapter_config.json is not a mapping")
        if not weights.exists() and not (path / "adapter_model.bin").exists():
            raise OSError(f"{weights.name} is missing")  # PEFT would fail deep inside, as an HF repo id
        if weights.exists():
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
    except (OSError, ValueError, UnicodeDecodeError, SafetensorError) as exc:
        raise RunFileError(f"{path} is not a readable adapter ({exc}); delete it and run the compile again to "
                           "train it anew") from exc
    return path


def default_run_dir(env_name: str, root: str | Path = "runs") -> Path:
    return Path(root) / f"{env_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def table_columns(rows: list[dict[str, Any]], with_scores: bool) -> list[str]:
    """metrics.csv's columns: success (strict), snapped success where it was measured, scores, the rest."""
    snapped = SNAPPED_COLUMNS if any(c in row for row in rows for c in SNAPPED_COLUMNS) else []
    return BASE_COLUMNS + snapped + (SCORE_COLUMNS if with_scores else []) + TAIL_COLUMNS


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def stage(self, name: str | int) -> Path:
        folder = self.path / (f"iter_{name}" if isinstance(name, int) else str(name))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def iterations(self) -> list[int]:
        found = []
        for child in self.path.glob("iter_*"):
            suffix = child.name.removeprefix("iter_")
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def last_adapter(self) -> Path | None:
        """The newest finished adapter (a run still training, or one from before `compiled.json`)."""
        for k in reversed(self.iterations()):
            adapter = self.path / f"iter_{k}" / "adapter"
            if (adapter / "adapter_config.json").exists():
                return adapter
        return None

    def compiled_adapter(self) -> Path | None:
        """The adapter compile returned (`compiled.json`), or the newest one for a run from before it chose."""
        chosen = self.path / COMPILED
        if not chosen.exists():
            return self.last_adapter()
        stage = read_json(chosen).get("stage")
        if not isinstance(stage, int) or stage not in self.iterations():
            raise RunFileError(f"{chosen} names stage {stage!r}, which {self.path} does not hold; compile the run "
                               "again (it resumes) to write it anew")
        return self.path / f"iter_{stage}" / "adapter"

    def copy_stages(self, source: RunFolder, names: list[str]) -> None:
        """Copy `source`'s finished stages that this run lacks (`bc_from`), each whole or not at all."""
        for name in names:
            target = self.path / name
            if (source.path / name / "metrics.json").exists() and not (target / "metrics.json").exists():
                tmp = target.with_name(name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source.path / name, tmp)
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)

    # -- metrics -------------------------------------------------------------------------------------------

    def metric_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name in ROW_ORDER:
            metrics = self.path / name / "metrics.json"
            if metrics.exists():
                rows.append(read_metrics(metrics))
        for k in self.iterations():
            metrics = self.path / f"iter_{k}" / "metrics.json"
            if metrics.exists():
                rows.append(read_metrics(metrics))
        return rows

    def finished(self, k: int) -> bool:
        """Whether stage `k` was trained and evaluated: a resume adopts it rather than making it again."""
        stage = self.path / f"iter_{k}"
        return (stage / "metrics.json").exists() and (stage / "adapter" / "adapter_config.json").exists()

    def corrections_log(self, k: int) -> JsonlLog[Correction]:
        """Stage `k`'s records, appended as each is made: behaviour cloning's demonstrated steps, a round's
        corrections."""
        return JsonlLog(self.stage(k) / "corrections.jsonl", Correction, key=lambda c: c.key)

    def corrections(self, k: int) -> list[Correction]:
        """Stage `k`'s records. A finished stage's are never made again, so a log of fewer than its metrics.json
        counted (cut or emptied since) is refused: later rounds would train on less without a word."""
        log, finished = self.corrections_log(k), self.path / f"iter_{k}" / "metrics.json"
        if not finished.exists():
            return list(log.load().values())
        records, counted = list(log.load(repair=False).values()), read_metrics(finished).get("corrections")
        if isinstance(counted, int) and len(records) < counted:
            raise RunFileError(f"{log.path} holds {len(records)} of the {counted} records its finished stage counted; "
                               "later rounds train on them: restore the file, or compile into a new run folder")
        return records

    def keep_adapter(self, k: int, previous: Path | None) -> Path:
        """Stage `k` without training rows keeps `previous` as its adapter (behaviour cloning with every
        demonstration dropped has none to keep; a round always has earlier data to fill its rows, so a round
        whose corrections were all dropped still trains on those)."""
        out = self.stage(k) / "adapter"
        if previous is None:
            raise RuntimeError(f"no training rows for {out.parent.name}: every demonstration was dropped")
        console.print(f"[yellow]{out.parent.name}: no usable corrections; keeping the previous adapter[/yellow]")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(previous, tmp)
        tmp.rename(out)
        atomic_write_json(out.parent / "train.json", {"skipped": "no usable corrections", "adapter_dir": str(out)})
        return out

    def summary_rows(self) -> dict[str, dict[str, str]]:
        """metrics.csv's rows by `iteration`: what a published run keeps of its stages' metrics."""
        path = self.path / "metrics.csv"
        if not path.exists():
            return {}
        try:
            with path.open(encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if "iteration" not in (reader.fieldnames or []):
                    raise ValueError("it has no iteration column")
                return {row["iteration"]: row for row in reader}
        except (UnicodeDecodeError, csv.Error, ValueError) as exc:
            raise RunFileError(f"{path} is not a metrics table ({exc}); a compile of the run writes it anew") from exc

    def stages(self) -> list[str]:
        """The evaluated stages in table order: base, expert, 0 (behaviour cloning), 1, 2, ..."""
        names = [*ROW_ORDER, *map(str, self.iterations())]
        return [n for n in names if (self.path / (f"iter_{n}" if n.isdigit() else n) / "metrics.json").exists()]

    def episodes(self) -> list[dict[str, Any]]:
        """Every evaluated episode's outcome, from the stages' eval logs; where a stage's log is gone or holds
        fewer episodes than its metrics.json counts (a published run keeps no logs; a damaged one), the stage's
        rows of `episodes.csv` stand in, so that rewriting the table never loses what it held."""
        from leap_dspy.types import SPLITS

        rows, tabled, stages = [], self._tabled_episodes(), self.stages()
        for stage in stages:
            folder = self.path / (f"iter_{stage}" if stage.isdigit() else stage)
            logged = self._logged_episodes(stage, folder) if (folder / "eval.jsonl").exists() else []
            evaluated = sum(read_metrics(folder / "metrics.json").get(f"{split}_episodes", 0) for split in SPLITS)
            kept = tabled.get(stage, [])
            if len(logged) < evaluated and ((folder / "eval.jsonl").exists() or (folder / "adapter").exists()):
                # a damaged log: the intervals over episodes would silently shrink
                console.print(f"[yellow]warning:[/yellow] {folder / 'eval.jsonl'} holds {len(logged)} of the "
                              f"{evaluated} episodes its metrics.json counts"
                              + (f"; episodes.csv's {len(kept)} stand in" if len(kept) > len(logged) else ""),
                              soft_wrap=True, highlight=False)
            rows += kept if len(kept) > len(logged) else logged
        # a run published with its summary alone keeps no stage folders: its table's rows are all there is
        return rows + [row for stage, kept in tabled.items() if stage not in stages for row in kept]

    def _logged_episodes(self, stage: str, folder: Path) -> list[dict[str, Any]]:
        from leap_dspy.store import JsonlLog
        from leap_dspy.types import Trajectory

        strict = JsonlLog(folder / "eval.jsonl", Trajectory, key=lambda t: t.task.id).load(repair=False)
        snapped = JsonlLog(folder / "eval_snapped.jsonl", Trajectory, key=lambda t: t.task.id).load(repair=False)
        lenient = int(any(t.num_snapped for t in strict.values()))
        rows = []
        for task_id, episode in strict.items():
            other = snapped.get(task_id, episode)
            rows.append({"stage": stage, "task_id": task_id, "split": episode.task.split,
                         "source": episode.task.source,
                         "success": int(episode.success), "reward": round(episode.reward, 4),
                         "steps": len(episode.steps), "success_snapped": int(other.success),
                         "reward_snapped": round(other.reward, 4), "lenient": lenient,
                         "actions": json.dumps([" ".join(s.action.split())[:80] for s in episode.steps])})
        return rows

    def _tabled_episodes(self) -> dict[str, list[dict[str, Any]]]:
        """episodes.csv's rows by stage (empty when it is missing or unreadable: the logs are then all there is)."""
        tabled: dict[str, list[dict[str, Any]]] = {}
        try:
            with (self.path / "episodes.csv").open(encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    tabled.setdefault(str(row.get("stage")), []).append(row)
        except (OSError, UnicodeDecodeError, csv.Error):
            return {}
        return tabled

    def write_episodes_csv(self) -> Path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EPISODE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.episodes())
        target = self.path / "episodes.csv"
        atomic_write_text(target, buffer.getvalue())
        return target

    def write_metrics_csv(self, with_scores: bool = False) -> Path:
        """One row per evaluated policy, rebuilt from each stage's metrics.json (so never duplicated)."""
        columns = table_columns(self.metric_rows(), with_scores)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.metric_rows():
            writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
        target = self.path / "metrics.csv"
        atomic_write_text(target, buffer.getvalue())
        return target

    def write_report(self, title: str, with_scores: bool = False) -> Path:
        rows = self.metric_rows()
        plot = self._plot(rows, with_scores)
        columns = table_columns(rows, with_scores)
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(_fmt(r.get(c, ''))))}</td>" for c in columns) + "</tr>"
            for r in rows
        )
        config = self.config_path.read_text() if self.config_path.exists() else ""
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}}
th{{background:#f3f3f3}}pre{{background:#f7f7f7;padding:1rem;overflow:auto}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Success rate of each policy: <b>base</b> is the untrained student, <b>expert</b> the privileged expert acting
itself (a reference, it sees what the student cannot), <b>0</b> behaviour cloning, then LEAP iterations.</p>
{f'<img src="{plot.name}" alt="learning curve" width="720">' if plot else ''}
<table><tr>{head}</tr>{body}</table>
<h2>Configuration</h2><pre>{html.escape(config)}</pre>
</body></html>"""
        target = self.path / "report.html"
        atomic_write_text(target, page)
        return target

    def _plot(self, rows: list[dict[str, Any]], with_scores: bool) -> Path | None:
        policy_rows = [r for r in rows if str(r.get("iteration")) not in ROW_ORDER]
        if not policy_rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        reference = {str(r["iteration"]): r for r in rows if str(r.get("iteration")) in ROW_ORDER}
        xs = [int(r["iteration"]) for r in policy_rows]
        metrics = ["seen_success", "unseen_success"] + (SCORE_COLUMNS if with_scores else [])
        fig, axes = plt.subplots(1, 2 if with_scores else 1, figsize=(9 if with_scores else 6, 4), squeeze=False)
        for ax, group in zip(axes[0], [metrics[:2], metrics[2:]], strict=False):
            for metric, colour in zip(group, ["tab:blue", "tab:orange"], strict=False):
                ys = [float(r.get(metric) or 0) for r in policy_rows]
                ax.plot(xs, ys, marker="o", color=colour, label=metric.replace("_", " "))
                for name, style in (("base", ":"), ("expert", "--")):
                    if name in reference and reference[name].get(metric) not in (None, ""):
                        ax.axhline(float(reference[name][metric]), color=colour, linestyle=style, alpha=0.6,
                                   label=f"{name} {metric.split('_')[0]}")
            ax.set_xlabel("iteration (0 = behaviour cloning)")
            ax.set_xticks(xs)
            ax.set_ylabel("score" if "score" in group[0] else "success rate")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("LEAP learning curve")
        fig.tight_layout()
        target = self.path / "learning_curve.png"
        tmp = target.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(target)
        return target


def best_stage(seen: dict[str, tuple[float, float]]) -> str | None:
    """DAgger's "best policy on validation": of the trained stages ("0", "1", ...) with their (success, score)
    on the seen tasks, the highest success, then score; a tie goes to the later stage, trained on more data.
    Rounded first, so that a report reading episodes.csv's rounded rewards chooses as the compile did."""
    def key(stage: str) -> tuple[float, float, int]:
        success, score = seen[stage]
        return round(float(success), 4), round(float(score), 2), int(stage)

    return max(seen, key=key) if seen else None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value
