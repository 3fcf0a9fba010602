"""WebShop's scripted expert (`envs/webshop/expertise.py`) on the built-in offline WebShop: it plays and wins
at the default privilege level, its reasons name only what the student saw, and reasons or actions that rest
on the privileged state are caught."""

from __future__ import annotations

import random

import pytest

from leap_dspy.envs.base import action_admissible
from leap_dspy.envs.webshop import WebShop
from leap_dspy.envs.webshop.expertise import WebShopExpertise, read_instruction, read_page, target_of
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.programs.student import run_episode
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import expert_rollout
from leap_dspy.types import PrivilegedState, StudentInputs, Task, Trajectory

SIZES = {"num_products": 1000, "seed": 0, "num_train": 60, "num_seen": 30, "num_unseen": 30}
LEAVING = ("click[< Prev]", "click[Back to Search]", "click[Next >]")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> WebShop:
    e = WebShop(**SIZES, cache_dir=str(tmp_path_factory.mktemp("webshop")))
    yield e
    e.close()


def student_like(env: WebShop, task: Task, seed: int) -> Trajectory:
    """An episode as a weak student plays it: half its steps a random admissible click (or a search of
    random instruction words), half the expert's, recording the top level's privileged state at each step."""
    rng, expertise, episode = random.Random(seed), WebShopExpertise(), env.clone()

    def act(inputs: StudentInputs) -> tuple[str, str, None]:
        actions = inputs.observation.split("\nActions: ")[-1].split(", ")
        if rng.random() < 0.5:
            action = rng.choice(actions)
            if action.startswith("search["):
                action = f"search[{' '.join(rng.sample(inputs.task.split(), 4))}]"
        else:
            action = expertise.act(inputs, episode.privileged_state(2), "") or "click[Buy Now]"
        return "", action, None

    return run_episode(act, Student().inputs, episode, task, capture_level=3, capture_oracle=True)


def at_level(top: PrivilegedState, level: int) -> PrivilegedState:
    """The privileged state of a lower level, cut from the top level's (levels only add sections)."""
    keep = {1: ("goal",), 2: ("goal", "target product")}.get(level)
    sections = {k: v for k, v in top.sections.items() if keep is None or k in keep} if level else {}
    return PrivilegedState(level=level, sections=sections,
                           oracle_action=top.oracle_action if level == 3 else None)


def test_the_default_level_has_a_scripted_policy(env: WebShop) -> None:
    assert env.default_privilege_level in env.expertise().levels
    assert max(env.privilege_levels) not in env.expertise().levels


def test_the_instruction_holds_the_goal(env: WebShop) -> None:
    """Level 0 reads from the instruction what level 1's goal section states."""
    for task in env.tasks("train") + env.tasks("unseen"):
        want, extra = read_instruction(task.instruction), task.model_extra
        assert want.kind == extra["product_type"]
        assert set(want.attributes) == set(extra["goal_attributes"])
        assert want.options == extra["goal_options"]
        assert want.limit == pytest.approx(extra["price_upper"])


@pytest.mark.parametrize("split", ["seen", "unseen"])
def test_the_expert_wins_most_tasks_at_the_default_level(env: WebShop, split: str) -> None:
    trajectories = expert_rollout(OracleExpert(), Student(), env, env.tasks(split),
                                  level=env.default_privilege_level, num_threads=1)
    assert sum(t.success for t in trajectories) / len(trajectories) >= 0.8
    assert sum(t.reward for t in trajectories) / len(trajectories) >= 0.9
    for step in (s for t in trajectories for s in t.steps):
        assert not unobserved_mentions(step.reason, step.inputs, step.privileged, step.action)
        if step.action in LEAVING:  # never back-and-forth without saying what was wrong on the page
            assert any(w in step.reason for w in ("is not", "offers no", "not lower than", "No result", "describes"))


def test_corrections_of_a_student_are_realizable_admissible_and_justified(env: WebShop) -> None:
    """At every level, on states a weak student reached, the expert's step is admissible and one the
    student's view justifies, and its reason names nothing of the privileged state the student never saw."""
    expertise, changed = WebShopExpertise(), 0
    for i, task in enumerate(env.tasks("train")[:40]):
        for step in student_like(env, task, seed=i).steps:
            for level in (0, 1, 2, 3):
                privileged = at_level(step.privileged, level)
                action = expertise.act(step.inputs, privileged, step.action)
                reason = expertise.explain(step.inputs, privileged, action)
                assert action_admissible(action, step.admissible_actions), (action, step.inputs.observation)
                assert not unobserved_mentions(reason, step.inputs, step.privileged, action), reason
                assert expertise.unjustified(step.inputs, privileged, action) is None, (action, reason)
                changed += action != step.action
    assert changed > 100


def _results_state(env: WebShop) -> tuple[StudentInputs, PrivilegedState, list[str]]:
    """A results page whose best-fitting results leave out some visible result (a choice to judge)."""
    for task in env.tasks("seen"):
        trajectory = expert_rollout(OracleExpert(), Student(), env, [task], level=3, record_level=3,
                                    num_threads=1)[0]
        for step in trajectory.steps:
            page = read_page(step.inputs.observation)
            if page.kind == "results" and len(page.results) >= 3:
                return step.inputs, step.privileged, [r.asin for r in page.results]
    raise AssertionError("no results page")


def test_choices_only_the_hidden_target_explains_are_flagged(env: WebShop) -> None:
    expertise = WebShopExpertise()
    inputs, privileged, shown = _results_state(env)
    best = expertise.act(inputs, privileged, "")
    assert expertise.unjustified(inputs, privileged, best) is None
    want = read_instruction(inputs.task)
    page = read_page(inputs.observation)
    weaker = [r.asin for r in page.results
              if len([a for a in want.attributes if a in r.title.lower()]) == 0 and f"click[{r.asin}]" != best]
    assert weaker
    for asin in weaker[:2]:
        assert "hidden target" in expertise.unjustified(inputs, privileged, f"click[{asin}]")
    target = env.catalog.by_asin[target_of(privileged)]
    assert "does not use" in expertise.unjustified(inputs, privileged, f"search[{target['brand']} {want.kind}]")
    assert expertise.unjustified(inputs, privileged, f"search[{want.query()}]") is None


def test_reasons_that_leak_the_privileged_state_are_flagged(env: WebShop) -> None:
    """Each kind of privileged fact, said on the search page where the student has seen only the
    instruction: the target's id, its name (brand, or an attribute the instruction does not ask for), its
    price, and a step of the oracle's plan. (The goal's attributes, options and price bound are all in the
    instruction, so saying them leaks nothing.)"""
    task = env.tasks("seen")[0]
    env.reset(task)
    top = env.privileged_state(3)
    observation = env.reset(task)
    inputs = Student().inputs(task, observation, [])
    target = env.catalog.by_asin[task.model_extra["target_asin"]]
    hidden = next(a for a in target["title"].lower().split() if a not in task.instruction.lower().split()
                  and len(a) > 3)
    leaks = {
        "id": f"I want {target['asin']}, the one to buy.",
        "brand": f"The {target['brand']} one is what the instruction wants.",
        "name word": f"I look for one whose name says {hidden}.",
        "price": f"It will cost ${target['price']:.2f}.",
        "plan": f"Then I open it: {top.sections['oracle plan'][1]}.",
    }
    for kind, reason in leaks.items():
        assert unobserved_mentions(reason, inputs, top, "search[x]"), kind
    want = read_instruction(task.instruction)
    fair = f"The instruction asks for {want.kind} with {', '.join(want.options.values()) or 'nothing else'}."
    assert not unobserved_mentions(fair, inputs, top, f"search[{want.query()}]")


def test_reasons_name_what_on_the_page_matches_or_contradicts_the_instruction() -> None:
    expertise = WebShopExpertise()
    task = ("i need a waterproof lipstick with color: coral, and price lower than 30.00 dollars")
    item = ("Back to Search [SEP] < Prev [SEP] color [SEP] coral [SEP] mauve [SEP] Nimbus Waterproof Lipstick for "
            "Women [SEP] Price: $45.99 [SEP] Rating: 4.0 [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now"
            "\nActions: click[Back to Search], click[< Prev], click[coral], click[mauve], click[Description], "
            "click[Features], click[Reviews], click[Buy Now]")
    inputs = StudentInputs(task=task, observation=item, history="search[waterproof lipstick coral]")
    nothing = PrivilegedState(level=0)
    assert expertise.act(inputs, nothing, "click[coral]") == "click[< Prev]"
    reason = expertise.explain(inputs, nothing, "click[< Prev]", "click[coral]")
    assert "$45.99" in reason and "30.00 dollars" in reason
    elsewhere = StudentInputs(task=task.replace("coral", "teal"), observation=item, history=inputs.history)
    reason = expertise.explain(elsewhere, nothing, "click[< Prev]")  # nothing offered: not "all of them clicked"
    assert reason.startswith("The page says: Nothing is clicked. The instruction asks for color: teal (not offered); "
                             "the rest not offered")
    cheaper = StudentInputs(task=task, observation=item.replace("$45.99", "$19.99"), history=inputs.history)
    assert expertise.act(cheaper, nothing, "click[< Prev]") == "click[coral]"
    reason = expertise.explain(cheaper, nothing, "click[coral]", "click[< Prev]")
    assert "color: coral" in reason and "do not go back" in reason
    # A click on what the page says is selected already: buy, and say why the click again is no step forward.
    chosen = StudentInputs(task=task, observation="You have clicked coral.\n" + cheaper.observation,
                           history=inputs.history + "\nclick[coral] -> You have clicked coral.")
    assert expertise.act(chosen, nothing, "click[coral]") == "click[Buy Now]"
    reason = expertise.explain(chosen, nothing, "click[Buy Now]", "click[coral]")
    assert "I buy it" in reason and "clicked coral already" in reason
    assert reason.startswith("The page says: You have clicked coral. The instruction asks for color: coral (clicked); "
                             "all of them clicked")
    # and it opens as the demonstration's reason for the same step: a small student's first words pick its action
    assert reason.startswith(expertise.explain(chosen, nothing, "click[Buy Now]"))
    # Two clicked values: the page's lines word for word, in its order, not a list the student has to join.
    both = StudentInputs(task=task, observation="You have clicked mauve.\nYou have clicked coral.\n"
                         + cheaper.observation, history=chosen.history)
    assert expertise.explain(both, nothing, "click[Buy Now]").startswith(
        "The page says: You have clicked mauve. You have clicked coral. The instruction asks for color: coral "
        "(clicked); all of them clicked")
