"""`leap-dspy experiment` and `leap-dspy report`: a grid of real tiny compiles over two seeds, shared behaviour
cloning, resumption, published summaries, and intervals that a report rebuilds from those summaries alone."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from leap_dspy.cli import app
from leap_dspy.experiment import Grid, expand
from leap_dspy.report import bootstrap

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_boxes": 3, "num_train": 3, "num_seen": 1, "num_unseen": 2, "max_steps": 8}


def test_bootstrap_intervals_cover_the_mean_and_narrow_with_more_games() -> None:
    rng = np.random.default_rng(0)
    few = bootstrap([rng.binomial(1, 0.5, 10).astype(float) for _ in range(3)], seed=1)
    many = bootstrap([rng.binomial(1, 0.5, 200).astype(float) for _ in range(3)], seed=1)
    assert few.low <= few.mean <= few.high and many.low <= many.mean <= many.high
    assert many.high - many.low < few.high - few.low
    sure = bootstrap([np.ones(5), np.ones(7)], seed=1)
    assert (sure.mean, sure.low, sure.high, sure.seeds, sure.games) == (1.0, 1.0, 1.0, 2, 12)


def test_a_grid_file_is_checked_and_expanded_with_shared_behaviour_cloning(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"env": "examples.keybox:KeyBox", "seeds": [0, 1],
                                    "grid": {"update": ["sft", "dpo"], "options.realizable": [True, False]}}))
    specs = expand(Grid.load(path))
    assert len(specs) == 8 and len({s.name for s in specs}) == 8
    assert [s.seed for s in specs] == [0, 0, 0, 0, 1, 1, 1, 1]  # every condition of a seed before the next seed
    shared = [s for s in specs if s.bc_from]
    assert len(shared) == 4 and all("update=dpo" in s.name and "update=sft" in s.bc_from for s in shared)
    path.write_text(yaml.safe_dump({"env": "alfworld", "grid": {"iterationz": [1]}}))
    with pytest.raises(ValueError, match="iterationz"):
        Grid.load(path)
    result = CliRunner().invoke(app, ["experiment", str(path)])
    assert result.exit_code == 2 and "iterationz" in result.output


def test_experiment_runs_publishes_resumes_and_reports(tiny_model: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # `examples` is a folder of the repository
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    settings = {"iterations": 1, "model": tiny_model, "max_train_rows": 16, "num_threads": 4,
                "lm": {"max_new_tokens": 16}, "evaluate_base": False, "train_launcher": "",  # in each compile's process
                "train": {"max_length": 512, "per_device_batch_size": 8, "gradient_accumulation": 1,
                          "progress_bar": False}}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "tiny", "env": "examples.keybox:KeyBox", "seeds": [0, 1],
                                    "options": TINY, "settings": settings,
                                    "grid": {"update": ["sft", "dpo"]}}))
    root, published = tmp_path / "runs", tmp_path / "published"
    args = ["experiment", str(grid), "--root", str(root), "--publish", str(published), "--min-free-gb", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + "".join(p.read_text()[-3000:] for p in root.glob("*.log"))
    runs = sorted(p.name for p in root.iterdir() if (p / "student.json").exists())
    assert runs == ["keybox-update=dpo-seed0", "keybox-update=dpo-seed1", "keybox-update=sft-seed0",
                    "keybox-update=sft-seed1"]
    dpo = yaml.safe_load((root / "keybox-update=dpo-seed1" / "config.yaml").read_text())
    assert dpo["bc_from"].endswith("keybox-update=sft-seed1") and dpo["env"]["seed"] == 1
    assert (dpo["update"], dpo["iterations"], dpo["model"]) == ("dpo", 1, tiny_model)  # the grid's settings
    assert not list(published.rglob("adapter*")) and len(list(published.glob("*/episodes.csv"))) == 4
    episodes = list(csv.DictReader((published / "keybox-update=sft-seed0" / "episodes.csv").open()))
    assert episodes and all(len(json.loads(e["actions"])) == int(e["steps"]) for e in episodes)  # what was done

    assert yaml.safe_load((published / "grid.yaml").read_text())["name"] == "tiny"  # what produced them

    shutil.rmtree(published)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "started" not in again.output  # finished runs are not run again,
    assert len(list(published.glob("*/episodes.csv"))) == 4  # and runs finished earlier are published

    # A rerun of one seed from its config.yaml alone: the same task ids, the same behaviour-cloning outcomes.
    first = root / "keybox-update=sft-seed0"
    rerun = CliRunner().invoke(app, ["compile", "--config", str(first / "config.yaml"), "--iterations", "0",
                                     "--run-dir", str(tmp_path / "rerun"), "--quiet"])
    assert rerun.exit_code == 0, rerun.output
    before, after = (yaml.safe_load((p / "config.yaml").read_text()) for p in (first, tmp_path / "rerun"))
    assert (after["trainset"], after["valset"], after["env"]) == (before["trainset"], before["valset"], before["env"])
    assert _bc_outcomes(tmp_path / "rerun") == _bc_outcomes(first)
    rows = [(p / "iter_0" / "train_rows.jsonl").read_bytes() for p in (first, tmp_path / "rerun")]
    assert rows[0] == rows[1]  # the same rows in the same order, whichever episode finished first

    for source, out in ((root, tmp_path / "report"), (published, tmp_path / "rebuilt")):
        result = CliRunner().invoke(app, ["report", str(source), "--out", str(out)])
        assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert "update=sft (2 seeds)" in page and "update=dpo (2 seeds)" in page and "| round 1 |" in page
    assert page.replace(str(root), "") == (tmp_path / "rebuilt" / "report.md").read_text().replace(
        str(published), "")  # the published summaries are enough to rebuild the report
    assert [p.stat().st_size > 10_000 for p in (tmp_path / "report").glob("*.png")] == [True]  # the plot

    shutil.rmtree(root / "keybox-update=dpo-seed1")  # its machine gone, its summaries published
    moved = CliRunner().invoke(app, [*args, "--no-run"])
    assert moved.exit_code == 0 and "4 of 4 runs done" in moved.output and "published" in moved.output
    shutil.rmtree(published / "keybox-update=dpo-seed1")
    partial = CliRunner().invoke(app, [*args, "--no-run"])  # a grid stopped part-way, published as it is
    assert partial.exit_code == 0 and "3 of 4 runs done; started none" in partial.output, partial.output
    assert not (root / "keybox-update=dpo-seed1").exists()


def _bc_outcomes(run: Path) -> list[tuple[str, str, int, int]]:
    rows = csv.DictReader((run / "episodes.csv").open())
    return sorted((r["task_id"], r["split"], int(r["success"]), int(r["steps"])) for r in rows if r["stage"] == "0")


def test_a_grid_continues_on_a_new_machine_from_its_published_runs(tmp_path: Path) -> None:
    """A run published with the grid's settings is done; a run that shared its behaviour cloning, whose adapter
    went with the old machine, clones again; a published run of other settings or tasks runs again."""
    from leap_dspy.experiment import expected_config, grid_states, reclone

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "updates", "env": "alfworld", "seeds": [0, 1],
                                         "settings": {"evaluate_base": False}, "grid": {"update": ["sft", "dpo"]}}))
    grid, publish, root = Grid.load(grid_file), tmp_path / "published", tmp_path / "runs"
    run = publish / "alfworld-update=sft-seed0"
    shutil.copytree(ROOT / "docs" / "results" / "alfworld-updates" / "alfworld-update=sft-seed0", run)
    specs = expand(grid)
    ran = yaml.safe_load((run / "config.yaml").read_text())  # its settings as a compile today writes them
    ran.update({k: v for k, v in expected_config(specs[0]).items() if k != "env"})
    (run / "config.yaml").write_text(yaml.safe_dump(ran))

    states = grid_states(grid, root, publish, specs)
    assert list(states.values()) == ["published", "pending", "pending", "pending"]
    reclone(specs, states, root)
    assert [s.bc_from for s in specs] == [None, None, None, "alfworld-update=sft-seed1"]  # dpo-seed0 clones itself
    result = CliRunner().invoke(app, ["experiment", str(grid_file), "--root", str(root), "--publish", str(publish),
                                      "--no-run"])
    assert result.exit_code == 0 and "1 of 4 runs done; started none" in result.output, result.output

    for other, named in (({"max_train_rows": 120}, "max_train_rows"), ({"expert": {"name": "SelfExpert"}}, "expert"),
                         ({"env": {**ran["env"], "num_unseen": 20}}, "env.num_unseen"),
                         ({"trainset": ran["trainset"][1:]}, "trainset"),  # the environment lists other tasks now
                         ({"task_digest": "0" * 16}, "task_digest")):  # or the same ids ask something else
        (run / "config.yaml").write_text(yaml.safe_dump({**ran, **other}))
        result = CliRunner().invoke(app, ["experiment", str(grid_file), "--root", str(root), "--publish",
                                          str(publish), "--no-run"])
        assert "0 of 4 runs done" in result.output and f"other {named}," in result.output, result.output


def test_a_run_another_grid_published_with_the_same_settings_is_copied_not_run(tmp_path: Path) -> None:
    """Grids overlap: the privilege grid's level 3 is the updates grid's SFT. A run published beside the grid's
    own folder with the same settings is copied in and says where from; one with other settings or tasks is not."""
    from leap_dspy.experiment import expected_config, grid_states

    results = tmp_path / "results"
    source = results / "updates" / "alfworld-update=sft-seed0"
    shutil.copytree(ROOT / "docs" / "results" / "alfworld-updates" / "alfworld-update=sft-seed0", source)
    grid_file = tmp_path / "privilege.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "privilege", "env": "alfworld", "seeds": [0],
                                         "settings": {"evaluate_base": False}, "grid": {"privilege_level": [0, 3]}}))
    grid, publish = Grid.load(grid_file), results / "privilege"
    specs = expand(grid)
    ran = yaml.safe_load((source / "config.yaml").read_text())
    ran.update({k: v for k, v in expected_config(specs[1]).items() if k != "env"})
    (source / "config.yaml").write_text(yaml.safe_dump(ran))

    states = grid_states(grid, tmp_path / "runs", publish, specs)
    assert states == {"alfworld-privilege_level=0-seed0": "pending", "alfworld-privilege_level=3-seed0": "published"}
    copy = publish / "alfworld-privilege_level=3-seed0"
    assert (copy / "copied_from.txt").read_text() == "updates/alfworld-update=sft-seed0\n"
    assert (copy / "metrics.csv").read_bytes() == (source / "metrics.csv").read_bytes()
    assert grid_states(grid, tmp_path / "runs", publish, specs) == states  # published now, in its own folder

    shutil.rmtree(copy)
    for other in ({"max_train_rows": 120}, {"valset": ran["valset"][:-1]}):  # other settings, or other tasks
        (source / "config.yaml").write_text(yaml.safe_dump({**ran, **other}))
        assert grid_states(grid, tmp_path / "runs", publish, specs)["alfworld-privilege_level=3-seed0"] == "pending"
        assert not copy.exists()


def test_a_run_finished_here_on_tasks_no_longer_listed_is_stale_and_not_published(tmp_path: Path) -> None:
    """A run in the grid's own folder that played other tasks than its environment lists today is neither done
    nor published (nor started again: its compile would refuse the new tasks in that folder)."""
    from leap_dspy.experiment import expected_config, grid_states

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"name": "one", "env": "alfworld", "seeds": [0],
                                         "settings": {"evaluate_base": False}}))
    grid, root, publish = Grid.load(grid_file), tmp_path / "runs", tmp_path / "published"
    [spec] = expand(grid)
    run = root / spec.name
    shutil.copytree(ROOT / "docs" / "results" / "alfworld-updates" / "alfworld-update=sft-seed0", run)
    (run / "student.json").write_text("{}")  # finished here: the student it returned
    ran = yaml.safe_load((run / "config.yaml").read_text())
    ran.update({k: v for k, v in expected_config(spec).items() if k != "env"})
    for trainset, state in ((ran["trainset"][1:], "stale"), (ran["trainset"], "done")):
        (run / "config.yaml").write_text(yaml.safe_dump({**ran, "trainset": trainset}))
        assert grid_states(grid, root, publish, [spec]) == {spec.name: state}
        assert (publish / spec.name / "episodes.csv").exists() == (state == "done")


def test_the_tasks_a_grid_compares_are_those_its_compile_would_record(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The listing process gets the run's seed and the grid's options as the compile does (a float in the
    options keeps its type); one that cannot list warns and leaves the runs compared by their settings."""
    from leap_dspy import experiment
    from leap_dspy.cli_settings import compile_tasks
    from leap_dspy.run_config import recorded_tasks

    monkeypatch.chdir(ROOT)  # `examples` is a folder of the repository, not an installed package
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.keybox import KeyBox

    spec = experiment.Spec("keybox-seed2", "examples.keybox:KeyBox", 2, {**TINY, "num_train": 4}, {}, "oracle")
    assert experiment.compile_options(spec)["seed"] == 2
    listed = experiment.tasks_today(spec.env, experiment.compile_options(spec))
    assert listed == recorded_tasks(*compile_tasks(KeyBox(**{**TINY, "num_train": 4}, seed=2)))
    assert listed != recorded_tasks(*compile_tasks(KeyBox(**{**TINY, "num_train": 4}, seed=0)))
    assert experiment.set_args({"lr": 1e-05})[1] == "lr=1.0e-05"  # JSON's 1e-05 reads back as a string

    broken = experiment.Spec("keybox-seed2", "examples.keybox:KeyBox", 2, {"no_such_option": 1}, {}, "oracle")
    assert experiment._other_tasks(broken, {"trainset": ["elsewhere"]}) == []
    assert "cannot list examples.keybox:KeyBox's tasks" in capsys.readouterr().err


def test_runs_at_once_share_the_cores_between_their_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch's threads spin at barriers: several compiles each using every core run far slower than in turn."""
    import subprocess

    from leap_dspy.experiment import job_environment

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert "OMP_NUM_THREADS" not in job_environment(1)
    assert job_environment(2)["OMP_NUM_THREADS"] == "4"
    assert job_environment(16)["OMP_NUM_THREADS"] == "1"
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             env=job_environment(4), capture_output=True, text=True, check=True).stdout
    assert threads.strip() == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's own choice stands
    assert job_environment(2)["OMP_NUM_THREADS"] == "3"


def test_a_scored_environment_reports_the_gain_in_success_and_in_score(tmp_path: Path) -> None:
    """Rebuilt from the published WebShop runs: a score counts partial purchases, so both gains are shown, each
    the mean over seeds of the paired per-goal differences."""
    published = ROOT / "docs" / "results" / "webshop-clicked-first"
    result = CliRunner().invoke(app, ["report", str(published), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "report.md").read_text().splitlines()
    head = next(line for line in lines if line.startswith("| all runs"))
    assert head.endswith("| unseen Δ vs BC (success) | unseen Δ vs BC (score) |")
    gains = {"success": [], "reward": []}
    for run in sorted(published.glob("webshop-seed*")):
        with (run / "episodes.csv").open() as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "unseen"]
        for metric, per_seed in gains.items():
            bc, round1 = ({r["task_id"]: float(r[metric]) for r in rows if r["stage"] == s} for s in ("0", "1"))
            per_seed.append(np.mean([round1[t] - bc[t] for t in round1]))
    cells = next(line for line in lines if line.startswith("| round 1 |")).strip("|").split("|")
    assert float(cells[-2].split()[0]) == pytest.approx(np.mean(gains["success"]), abs=0.006)
    assert float(cells[-1].split()[0]) == pytest.approx(100 * np.mean(gains["reward"]), abs=0.06)


def test_a_split_of_several_task_sources_is_reported_by_source(tmp_path: Path) -> None:
    """A mean over shipped and generated tasks together could hide that one of them does not move: the report
    adds each source's success and gain, each over its own tasks only."""
    run = tmp_path / "runs" / "sql-seed0"
    shutil.copytree(ROOT / "docs" / "results" / "intercode-sql-shipped" / "intercode-sql-seed0", run)
    with (run / "episodes.csv").open() as f:
        rows = list(csv.DictReader(f))
    unseen = sorted({r["task_id"] for r in rows if r["split"] == "unseen"})
    first = set(unseen[: len(unseen) // 2])
    for r in rows:
        r["source"] = "first" if r["task_id"] in first else "second"
    with (run / "episodes.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "out" / "report.md").read_text().splitlines()
    head = next(line for line in lines if "unseen by source" in line).strip("|").split("|")
    assert [h.strip() for h in head[1:3]] == [f"first success ({len(first)})", "first Δ vs BC (success)"]
    table = lines[lines.index(next(line for line in lines if "unseen by source" in line)):]
    cells = next(line for line in table if line.startswith("| round 1 |")).strip("|").split("|")
    mine = {s: {r["task_id"]: float(r["success"]) for r in rows if r["stage"] == s and r["task_id"] in first}
            for s in ("0", "1")}
    assert float(cells[1].split()[0]) == pytest.approx(np.mean(list(mine["1"].values())), abs=0.006)
    assert float(cells[2].split()[0]) == pytest.approx(np.mean([mine["1"][t] - mine["0"][t] for t in mine["1"]]),
                                                       abs=0.006)


def test_a_report_over_several_environments_opens_with_the_last_round_against_behaviour_cloning(
        tmp_path: Path) -> None:
    results = ROOT / "docs" / "results"
    result = CliRunner().invoke(app, ["report", str(results / "alfworld"), str(results / "webshop-clicked-first"),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "report.md").read_text().splitlines()
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.split("|")[1:-1]]

    summary = {cells(line)[0]: cells(line) for line in lines[lines.index("## summary"):lines.index("## alfworld")]
               if line.startswith(("| alfworld", "| webshop"))}
    assert [summary[e][4] for e in ("alfworld", "webshop")] == ["success", "score"]  # WebShop grades partly
    for env, metric in (("alfworld", "unseen success"), ("webshop", "unseen score")):
        table = lines[lines.index(f"## {env}"):]
        column = cells(next(line for line in table if line.startswith("| all runs"))).index(metric)
        own = {cells(line)[0]: cells(line) for line in table[:12] if line.startswith(("| BC", "| round 2"))}
        # the whole cell, interval included: one estimate, one interval, wherever the page shows it
        assert summary[env][5] == own["BC"][column]
        assert summary[env][6] == f"{own['round 2'][column]} (round 2)"
        assert summary[env][7] == own["round 2"][-1]



def test_a_report_pairs_each_condition_s_last_round_with_another_s(tmp_path: Path) -> None:
    """Rebuilt from the published privilege grid: level 0 against level 3 is the mean over seeds of the per-game
    differences of their last rounds, on the same seed's games."""
    published = ROOT / "docs" / "results" / "alfworld-privilege"
    result = CliRunner().invoke(app, ["report", str(published), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| alfworld | privilege_level=0 | privilege_level=3 |"))
    per_seed = []
    for seed in range(3):
        wins = []
        for level in (0, 3):
            with (published / f"alfworld-privilege_level={level}-seed{seed}" / "episodes.csv").open() as f:
                wins.append({r["task_id"]: float(r["success"]) for r in csv.DictReader(f)
                             if r["stage"] == "2" and r["split"] == "unseen"})
        per_seed.append(np.mean([wins[0][t] - wins[1][t] for t in wins[0]]))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:5] == ["3", "success"]
    assert float(cells[5].split()[0]) == pytest.approx(np.mean(per_seed), abs=0.006)
    same = next(line for line in (tmp_path / "report.md").read_text().splitlines()
                if line.startswith("| alfworld | privilege_level=1 | privilege_level=2 |"))
    assert same.endswith("| 0.00 [0.00, 0.00] |")  # levels 1 and 2 trained on the same rows


def test_a_run_published_with_its_summary_alone_keeps_its_wall_time(tmp_path: Path) -> None:
    """Early grids published config, metrics.csv and episodes.csv only: the report rebuilds their cost from
    metrics.csv and says their memory was not recorded, rather than 0."""
    run = tmp_path / "alfworld-seed0"
    shutil.copytree(ROOT / "docs" / "results" / "alfworld" / "alfworld-seed0", run)
    assert not list(run.glob("*/metrics.json"))
    with (run / "metrics.csv").open() as f:
        wall = sum(float(r["wall_s"]) for r in csv.DictReader(f) if r["iteration"].isdigit())
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    cost = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
                if line.startswith("| all runs | 1 |"))
    assert cost.split("|")[3:5] == [f" {wall / 60:.1f} ", " not recorded "]


def test_the_best_round_on_seen_is_dagger_s_rule_judged_on_unseen(tmp_path: Path) -> None:
    """Each seed's row is the stage with the best seen success (then score, ties to the later), and its unseen
    cells are that stage's games, so a report shows what `--select best` would have returned."""
    from leap_dspy.runs import best_stage

    assert best_stage({"0": (0.4, 40.0), "1": (0.85, 80.0), "2": (0.2, 60.0)}) == "1"
    assert best_stage({"0": (0.5, 40.0), "1": (0.5, 50.0), "2": (0.5, 50.0)}) == "2"
    assert best_stage({}) is None
    published = ROOT / "docs" / "results" / "webshop-clicked-first"
    scores = []
    for run in sorted(published.glob("webshop-seed*")):
        with (run / "episodes.csv").open() as f:
            rows = list(csv.DictReader(f))
        def mean(stage: str, split: str, key: str, rows: list[dict[str, str]] = rows) -> float:
            values = [float(r[key]) for r in rows if r["stage"] == stage and r["split"] == split]
            return sum(values) / len(values)
        rounds = sorted({r["stage"] for r in rows if r["stage"].isdigit()})
        chosen = best_stage({s: (mean(s, "seen", "success"), mean(s, "seen", "reward")) for s in rounds})
        scores.append(100 * mean(str(chosen), "unseen", "reward"))
    result = CliRunner().invoke(app, ["report", str(published), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines()
               if line.startswith("| best round on seen |"))
    assert row.split("|")[3].split()[0] == f"{sum(scores) / len(scores):.1f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_grid_stopped_by_sigterm_stops_its_runs_and_leaves_them_pending(tmp_path: Path) -> None:
    """A scheduler's or `timeout`'s SIGTERM reaches the grid alone, not its process group: the grid stops its
    compiles (left running, a rerun found their folders in use) and records them as pending."""
    import signal
    import subprocess
    import time

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "slow", "env": "tests.data_env:SlowBox", "seeds": [0, 1],
                                    "settings": {"model": "tiny-random"}}))
    command = [sys.executable, "-m", "leap_dspy", "experiment", str(grid), "--root", str(tmp_path / "runs"),
               "--jobs", "2", "--min-free-gb", "0"]
    grid_process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = Path(f"/proc/{grid_process.pid}/task/{grid_process.pid}/children")
    deadline = time.monotonic() + 60
    while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    compiles = [int(pid) for pid in children.read_text().split()]
    assert len(compiles) == 2
    grid_process.send_signal(signal.SIGTERM)
    grid_process.communicate(timeout=60)
    for pid in compiles:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    states = json.loads((tmp_path / "runs" / "grid.json").read_text())["states"]
    assert set(states.values()) == {"pending"}


def test_a_condition_names_every_environment_option_that_varies_but_not_what_follows_from_a_setting() -> None:
    """Two room sizes whose step limits follow from them: config.yaml cannot say which the user set, so the
    label names both, where it used to name only the alphabetically first (the derived step limit); a DPO run's
    learning rate still follows from its update and stays out."""
    from leap_dspy.report import _independent

    flat = [{"env.num_servers": servers, "env.max_steps": 2 * servers + 2, "update": update,
             "iteration_lr": 2e-4 if update == "sft" else 5e-5} for servers in (4, 5) for update in ("sft", "dpo")]
    keys = sorted(flat[0])
    assert _independent(keys, flat) == ["env.max_steps", "env.num_servers", "update"]
