"""ALFWorld: real games generated offline (alfworld's domain + Fast Downward), played through textworld."""

from __future__ import annotations

import json
import random
import sys
import threading
import uuid
from pathlib import Path

import pytest

pytest.importorskip("alfworld")
pytest.importorskip("textworld")

from leap_dspy.envs.alfworld import ALFWorld, ALFWorldTask  # noqa: E402
from leap_dspy.envs.alfworld.generate import split_floor_plans  # noqa: E402

TYPES = ["pick_two_obj_and_place", "pick_clean_then_place_in_recep"]
SMALL = {"num_receptacles": 5, "task_types": TYPES, "num_train": 2, "num_seen": 1, "num_unseen": 1, "seed": 3}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ALFWorld:
    environment = ALFWorld(**SMALL, cache_dir=str(tmp_path_factory.mktemp("alfworld-cache")))
    yield environment
    environment.close()


@pytest.fixture(scope="module")
def all_tasks(env: ALFWorld) -> dict[str, list[ALFWorldTask]]:
    return {split: env.tasks(split) for split in ("train", "seen", "unseen")}


def play_oracle(env: ALFWorld, obs) -> object:
    while not obs.done:
        action = env.oracle_action()
        if action is None:
            break
        obs = env.step(action)
    return obs


def test_generated_games_are_real_and_oracle_wins(env: ALFWorld, all_tasks) -> None:
    for split, tasks in all_tasks.items():
        assert len(tasks) == {"train": 2, "seen": 1, "unseen": 1}[split]
        for task in tasks:
            assert task.env == "alfworld" and task.split == split
            data = json.loads(Path(task.game_file).read_text())
            assert data["solvable"] is True and "(define (problem" in data["pddl_problem"]
            assert "Your task is to: " + task.instruction in data["grammar"]
            obs = env.reset(task)
            assert obs.text.startswith("You are in the middle of a room.")
            assert "Your task is to: " + task.instruction in obs.text
            assert obs.admissible_actions
            obs = play_oracle(env, obs)
            assert obs.success and obs.done and obs.reward == 1.0, (task.id, task.task_type)
            assert env.oracle_action() is None
    assert {t.task_type for t in all_tasks["train"]} == set(TYPES)


def test_invalid_action_never_raises(env: ALFWorld, all_tasks) -> None:
    task = all_tasks["train"][0]
    obs = env.reset(task)
    for action in ["fly to the moon", "", "   ", "take 12345 from nowhere", "go to fridge 99", "\n"]:
        obs = env.step(action)
        assert obs.text == "Nothing happens."
        assert not obs.done and obs.admissible_actions
        assert obs.info["valid"] is False and obs.info["changed"] is False
    # light normalisation: case, whitespace, trailing period
    obs = env.step("  LOOK. ")
    assert obs.text != "Nothing happens." and obs.info["valid"] is True and obs.info["changed"] is True
    # the oracle still wins after invalid actions (they change nothing)
    assert play_oracle(env, obs).success


def test_episode_ends_at_max_steps(tmp_path: Path, env: ALFWorld, all_tasks) -> None:
    short = ALFWorld(**{**SMALL, "max_steps": 3}, cache_dir=env.cache_dir)
    obs = short.reset(all_tasks["train"][0])
    for _ in range(3):
        obs = short.step("inventory")
    assert obs.done and not obs.success
    assert short.step("look").text == "The episode is over."
    short.close()


def test_splits_disjoint_and_unseen_floor_plans_held_out(all_tasks) -> None:
    ids = [t.id for tasks in all_tasks.values() for t in tasks]
    assert len(ids) == len(set(ids))
    problems = [
        json.loads(Path(t.game_file).read_text())["pddl_problem"]
        for tasks in all_tasks.values()
        for t in tasks
    ]
    assert len(problems) == len(set(problems))
    train_fps, unseen_fps = split_floor_plans(SMALL["seed"])
    assert not set(train_fps) & set(unseen_fps) and len(unseen_fps) >= 20
    for task in all_tasks["train"] + all_tasks["seen"]:
        assert int(task.floor_plan.removeprefix("FloorPlan")) in train_fps
    for task in all_tasks["unseen"]:
        assert int(task.floor_plan.removeprefix("FloorPlan")) in unseen_fps


def test_same_seed_reproduces(tmp_path: Path, env: ALFWorld, all_tasks) -> None:
    other = ALFWorld(**SMALL, cache_dir=str(tmp_path / "other"))
    for split in ("train", "unseen"):
        again = other.tasks(split)
        for a, b in zip(all_tasks[split], again, strict=True):
            assert (a.instruction, a.floor_plan, a.task_type) == (b.instruction, b.floor_plan, b.task_type)
            ga, gb = (json.loads(Path(t.game_file).read_text()) for t in (a, b))
            assert ga["pddl_problem"] == gb["pddl_problem"]
            assert ga["walkthrough"] == gb["walkthrough"]
    other.close()


def test_privileged_levels_nest(env: ALFWorld, all_tasks) -> None:
    env.reset(all_tasks["train"][0])
    env.step("look")
    assert env.privileged_state(0).sections == {}
    assert env.privileged_state(0).to_text() == "(no privileged information)"
    previous: dict = {}
    for level in (1, 2, 3):
        state = env.privileged_state(level)
        assert set(previous) < set(state.sections)
        for name, body in previous.items():
            assert state.sections[name] == body
        previous = state.sections
    plan = previous["expert plan"]
    assert plan and plan[0] == env.oracle_action()
    assert any(" is in/on " in line for line in previous["object locations"])
    with pytest.raises(ValueError):
        env.privileged_state(7)
    info = env.task_info()
    assert info["task_type"] == all_tasks["train"][0].task_type and info["object_target"]


def test_oracle_recovers_after_wrong_actions(env: ALFWorld, all_tasks) -> None:
    rng = random.Random(0)
    tasks = all_tasks["train"] + all_tasks["seen"] + all_tasks["unseen"]
    wins = 0
    for i in range(8):
        task = tasks[i % len(tasks)]
        obs = env.reset(task)
        for _ in range(rng.randint(2, 5)):
            obs = env.step(rng.choice(obs.admissible_actions))
        wins += play_oracle(env, obs).success
    assert wins >= 7


def test_clone_and_threads(env: ALFWorld, all_tasks) -> None:
    clone = env.clone()
    assert clone.config() == env.config()
    json.dumps(clone.config())
    assert [t.id for t in clone.tasks("train")] == [t.id for t in all_tasks["train"]]
    results: list[bool] = []

    def run(e: ALFWorld, task: ALFWorldTask) -> None:
        results.append(play_oracle(e, e.reset(task)).success)

    threads = [
        threading.Thread(target=run, args=(e, t))
        for e, t in zip([env, clone], all_tasks["train"], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True, True]
    clone.close()


def test_official_data_dir_without_games_is_a_clear_error(tmp_path: Path) -> None:
    env = ALFWorld(**SMALL, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="json_2.1.1"):
        env.tasks("seen")


def test_notes_follow_the_episode_from_what_the_student_was_shown(env: ALFWorld, all_tasks) -> None:
    """The notes are recomputed here from the texts the student saw alone: nothing else can shape them."""
    from leap_dspy.envs.alfworld.notes import read_note, scene_places, transcript_notes

    for task in all_tasks["train"]:
        first = env.reset(task)
        places = scene_places(first.text)
        assert read_note(first.notes, "At") == "start" and read_note(first.notes, "Holding") == "nothing"
        assert read_note(first.notes, "Unvisited") == ", ".join(places)
        turns, obs, held_once = [], first, False
        while not obs.done:
            action = env.oracle_action()
            obs = env.step(action)
            turns.append((action, obs.text))
            if obs.done:
                assert obs.notes is None  # the episode is over: nothing left to decide
                break
            assert obs.notes == transcript_notes(task.instruction, first.text, turns)
            arrived = obs.text.startswith("You arrive at ")
            if arrived:
                assert read_note(obs.notes, "At") == obs.text.removeprefix("You arrive at ").split(".")[0]
                assert read_note(obs.notes, "At") not in (read_note(obs.notes, "Unvisited") or "")
            if obs.text.startswith("You pick up the "):
                held_once = True
                assert read_note(obs.notes, "Holding").split(" (")[0] in obs.text
        assert obs.success and held_once
    obs = env.reset(all_tasks["train"][0])
    before = obs.notes
    assert env.step("fly to the moon").notes == before  # an invalid action teaches nothing


@pytest.mark.parametrize("level", [0, 1, 2])
def test_the_scripted_expert_wins_below_the_oracle_level(env: ALFWorld, all_tasks, level: int) -> None:
    """Level 0 plays from the student's view alone, 1 and 2 add what the privileged state says."""
    from leap_dspy.programs import OracleExpert, Student
    from leap_dspy.rollout import expert_capture, expert_rollout

    assert expert_capture(OracleExpert(), env, level) == (level, False)  # no oracle below the top
    assert expert_capture(OracleExpert(), env, 3) == (None, True)
    tasks = all_tasks["train"] + all_tasks["seen"] + all_tasks["unseen"]
    trajectories = expert_rollout(OracleExpert(), Student(), env, tasks, level=level, num_threads=1)
    assert all(t.success for t in trajectories), [(t.task.task_type, [s.action for s in t.steps])
                                                  for t in trajectories if not t.success]
    assert not any(s.error for t in trajectories for s in t.steps)


def test_fast_downward_leaves_the_scripts_arguments(monkeypatch) -> None:
    """Fast Downward's translation (each new game's reset) rewrites `sys.argv`; the installed one restores it."""
    import fast_downward

    from leap_dspy.envs.alfworld import textworld_cache

    textworld_cache.install()
    name = f"d{uuid.uuid4().hex}"  # a new domain: not memoised yet
    domain = (f"(define (domain {name}) (:requirements :strips) (:predicates (p))"
              " (:action a :parameters () :precondition (and) :effect (p)))")
    problem = f"(define (problem q) (:domain {name}) (:init) (:goal (p)))"
    monkeypatch.setattr(sys, "argv", ["my-script", "--flag"])
    fast_downward.pddl2sas(domain, problem)
    assert sys.argv == ["my-script", "--flag"]


def test_memoised_textworld_parsing_changes_no_observation(env: ALFWorld, all_tasks, monkeypatch) -> None:
    """Every observation of an oracle episode is the same with TextWorld's own parsers as with the memoised ones,
    and a second play of the same game is answered from the caches."""
    import fast_downward
    import textworld.logic
    from textworld.envs.pddl import logic, textgen

    from leap_dspy.envs.alfworld import textworld_cache

    def transcript(task: ALFWorldTask) -> list[tuple[str, tuple[str, ...]]]:
        obs = env.reset(task)
        seen = [(obs.text, tuple(obs.admissible_actions))]
        while not obs.done and (action := env.oracle_action()) is not None:
            obs = env.step(action)
            seen.append((obs.text, tuple(obs.admissible_actions)))
        return seen

    task = all_tasks["train"][0]
    env.reset(all_tasks["seen"][0])  # another game loaded first, so the next reset loads and translates again
    cached = transcript(task)
    hits = textgen._parse_and_convert.cache_info().hits
    assert transcript(task) == cached and textgen._parse_and_convert.cache_info().hits > hits
    for module, name in ((textgen, "_parse_and_convert"), (logic, "_parse_and_convert"),
                         (textworld.logic, "_parse_and_convert"), (fast_downward, "pddl2sas")):
        monkeypatch.setattr(module, name, getattr(module, name).__wrapped__)
    env.reset(all_tasks["seen"][0])
    assert transcript(task) == cached
    assert textworld_cache._installed
