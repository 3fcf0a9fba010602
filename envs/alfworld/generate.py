"""Offline ALFWorld game generation on the floor plans that ship with alfworld.

A game is written the way `alfworld-generate` writes one: `initial_state.pddl` (the problem) and
`traj_data.json` (task type, `pddl_params`) go in, `game.tw-pddl` comes out as the JSON that holds alfworld's
PDDL domain, its grammar with the templated goal text ("UNKNOWN GOAL" replaced, as
`alfworld.agents.utils.misc.add_task_to_grammar` does), the problem, `solvable` and the expert's
`walkthrough`. The solvability check loads the game in textworld's PddlEnv (Fast Downward grounds it) and
lets alfworld's handcoded expert play it; only games the expert wins within the step budget are kept.

The problem itself is written from a shipped layout (`gen/layouts/FloorPlan*-objects.json` lists the object
and receptacle types of the scene, `-openable.json` the ids and poses of its openable receptacles,
`-layout.npy` reachable floor points): receptacles, objects, counts and placements are drawn from a seeded
generator, and validity (what may go where, what can be cleaned/heated/cooled) comes from alfworld's own
constant tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
UTILITY = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
LAMP_HOSTS = ("Desk", "SideTable", "Dresser")
LAMP = "DeskLamp"
ROOM_GROUPS = {
    "kitchen": range(1, 31),
    "livingroom": range(201, 231),
    "bedroom": range(301, 331),
    "bathroom": range(401, 431),
}
UNSEEN_PER_GROUP = 6  # 24 of 120 floor plans are held out for the unseen split


def _alfworld_dir() -> Path:
    import alfworld

    return Path(alfworld.__file__).parent


def domain_path() -> Path:
    return _alfworld_dir() / "data" / "alfred.pddl"


def grammar_path() -> Path:
    return _alfworld_dir() / "data" / "alfred.twl2"


def layouts_dir() -> Path:
    return _alfworld_dir() / "gen" / "layouts"


@cache
def _constants() -> dict[str, Any]:
    import alfworld.gen.constants as c

    fixed = set(c.RECEPTACLES) - set(c.MOVABLE_RECEPTACLES)
    placeable = set()
    for objs in c.VAL_RECEPTACLE_OBJECTS.values():
        placeable |= set(objs)
    pickupable = {
        o
        for o in placeable
        if o in c.OBJECTS
        and o not in fixed
        and "Sliced" not in o
        and o not in c.VAL_ACTION_OBJECTS["Toggleable"]
    }
    return {
        "fixed": fixed,
        "pickupable": pickupable,
        "contains": {r: set(objs) for r, objs in c.VAL_RECEPTACLE_OBJECTS.items()},
        "openable": set(c.OPENABLE_CLASS_LIST),
        "actions": {k: set(v) for k, v in c.VAL_ACTION_OBJECTS.items()},
        "objects": list(c.OBJECTS),
    }


@cache
def floor_plan(num: int) -> dict[str, Any]:
    import numpy as np

    base = layouts_dir() / f"FloorPlan{num}"
    types = json.loads(Path(f"{base}-objects.json").read_text())
    openable = json.loads(Path(f"{base}-openable.json").read_text())
    points = [(float(x), float(z)) for x, z in np.load(f"{base}-layout.npy").tolist()]
    const = _constants()
    recep_types = sorted(t for t in types if t in const["fixed"])
    if "Sink" in types and "SinkBasin" not in recep_types and any(k.endswith("|SinkBasin") for k in openable):
        recep_types.append("SinkBasin")
    return {
        "num": num,
        "recep_types": recep_types,
        "object_types": sorted(t for t in types if t in const["pickupable"]),
        "openable": openable,
        "points": points,
        "lamp": LAMP in types,
    }


def all_floor_plans() -> list[int]:
    nums = []
    for path in layouts_dir().glob("FloorPlan*-objects.json"):
        nums.append(int(path.name[len("FloorPlan") :].split("-")[0]))
    return sorted(nums)


def _targets(fp: dict[str, Any], task_type: str) -> list[tuple[str, str, str]]:
    """Feasible (object_target, parent_target, toggle_target) triples for a task type in a floor plan."""
    const = _constants()
    recs = set(fp["recep_types"])
    objs = fp["object_types"]
    out = []
    if task_type == "look_at_obj_in_light":
        if not fp["lamp"] or not recs & set(LAMP_HOSTS):
            return []
        for o in objs:
            if any(o in const["contains"].get(r, ()) for r in recs):
                out.append((o, "", LAMP))
        return out
    utility = UTILITY.get(task_type)
    if utility and utility not in recs:
        return []
    action = {"SinkBasin": "Cleanable", "Microwave": "Heatable", "Fridge": "Coolable"}.get(utility or "")
    for o in objs:
        if action and o not in const["actions"][action]:
            continue
        for r in sorted(recs):
            if r == utility or o not in const["contains"].get(r, ()):
                continue
            # the object must start somewhere that is not a receptacle of the target type
            if not any(o in const["contains"].get(r2, ()) for r2 in recs if r2 != r):
                continue
            out.append((o, r, ""))
    return out


def feasible(fp_num: int, task_type: str) -> bool:
    return bool(_targets(floor_plan(fp_num), task_type))


def split_floor_plans(seed: int) -> tuple[list[int], list[int]]:
    """(train/seen floor plans, unseen floor plans): a seeded, room-type-stratified hold-out."""
    rng = random.Random(f"alfworld-floorplans-{seed}")
    available = set(all_floor_plans())
    train, unseen = [], []
    for group in ROOM_GROUPS.values():
        nums = [n for n in group if n in available]
        rng.shuffle(nums)
        unseen += nums[:UNSEEN_PER_GROUP]
        train += nums[UNSEEN_PER_GROUP:]
    return sorted(train), sorted(unseen)


def _mangle(name: str) -> str:
    table = {"|": "_bar_", "+": "_plus_", "-": "_minus_", ".": "_dot_", ",": "_comma_"}
    return "".join(table.get(ch, ch) for ch in name)


def _coord(rng: random.Random) -> str:
    value = rng.uniform(-3.5, 3.5)
    return f"{'+' if value >= 0 else '-'}{abs(value):05.2f}"


def _new_id(kind: str, rng: random.Random, taken: set[str]) -> str:
    while True:
        ident = f"{kind}|{_coord(rng)}|{_coord(rng)}|{_coord(rng)}"
        if kind == "SinkBasin":
            ident = f"Sink|{_coord(rng)}|{_coord(rng)}|{_coord(rng)}|SinkBasin"
        if ident not in taken:
            taken.add(ident)
            return ident


def _kind(ident: str) -> str:
    return (
        "SinkBasin"
        if ident.endswith("|SinkBasin")
        else ("BathtubBasin" if ident.endswith("|BathtubBasin") else ident.split("|")[0])
    )


def build_problem(fp_num: int, task_type: str, num_receptacles: int, rng: random.Random) -> tuple[str, dict]:
    """A PDDL problem and its traj_data for one game, drawn from `rng` (in a fixed order: a seed is a game)."""
    import alfworld.gen.goal_library as glib

    const = _constants()
    fp = floor_plan(fp_num)
    obj_t, parent_t, toggle_t = rng.choice(_targets(fp, task_type))
    chosen, lamp_host = _choose_receptacles(fp, const, task_type, obj_t, parent_t, num_receptacles, rng)
    loc_of, agent_loc = _locations(fp, chosen, rng)
    objects, lamp = _place_objects(fp, const, chosen, task_type, obj_t, parent_t, lamp_host, num_receptacles, rng)
    goal = glib.gdict[task_type]["pddl"].format(obj=obj_t, recep=parent_t, toggle=toggle_t, mrecep="")
    init = _init_facts(const, chosen, objects, lamp, loc_of, agent_loc, obj_t)
    problem = (
        f"(define (problem plan_{task_type}_{fp_num})\n    (:domain alfred)\n    (:objects\n        "
        + "\n        ".join(_object_lines(const, chosen, objects, loc_of, agent_loc, obj_t))
        + "\n    )\n    (:init\n        "
        + "\n        ".join(init)
        + "\n    )\n"
        + goal.replace("#", "-").strip()
        + "\n"
    )
    template = rng.choice(glib.gdict[task_type]["templates"])
    goal_text = template.format(obj=obj_t.lower(), recep=parent_t.lower(), toggle=toggle_t.lower(), mrecep="")
    traj = {
        "task_type": task_type,
        "pddl_params": {
            "object_target": obj_t,
            "parent_target": parent_t,
            "toggle_target": toggle_t,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": f"FloorPlan{fp_num}", "scene_num": fp_num},
        "goal_text": goal_text,
        "turk_annotations": {"anns": [{"task_desc": goal_text}]},
    }
    return problem, traj


def _choose_receptacles(fp: dict[str, Any], const: dict[str, Any], task_type: str, obj_t: str, parent_t: str,
                        num_receptacles: int, rng: random.Random) -> tuple[list[str], str | None]:
    """The game's receptacles, sorted: the ones the task needs first, then the scene's (openable ids as shipped,
    others made up); and the lamp's host for a look-in-light task."""
    recs = set(fp["recep_types"])
    taken: set[str] = set()
    by_kind: dict[str, list[str]] = {}
    for ident in fp["openable"]:
        by_kind.setdefault(_kind(ident), []).append(ident)
    pool: list[str] = []
    for kind in sorted(recs):
        ids = sorted(by_kind.get(kind, []))
        pool += ids if ids else [_new_id(kind, rng, taken)]
    rng.shuffle(pool)
    chosen: list[str] = []

    def take(kind: str) -> str:
        ident = next((i for i in pool if _kind(i) == kind and i not in chosen), None) or _new_id(kind, rng, taken)
        chosen.append(ident)
        return ident

    if parent_t:
        take(parent_t)
    if task_type in UTILITY:
        take(UTILITY[task_type])
    lamp_host = take(rng.choice(sorted(recs & set(LAMP_HOSTS)))) if task_type == "look_at_obj_in_light" else None
    start_ok = [r for r in sorted(recs) if r != parent_t and obj_t in const["contains"].get(r, ())]
    if not any(_kind(c) in start_ok for c in chosen):
        take(rng.choice(start_ok))
    chosen += [i for i in pool if i not in chosen][: max(0, num_receptacles - len(chosen))]
    while len(chosen) < num_receptacles:  # small scenes: add more instances of the scene's types
        chosen.append(_new_id(rng.choice(sorted(recs)), rng, taken))
    return sorted(chosen), lamp_host


def _locations(fp: dict[str, Any], chosen: list[str], rng: random.Random) -> tuple[dict[str, str], str]:
    """One location per receptacle (its shipped agent pose where known, else a reachable floor point), and the
    agent's start."""
    points = list(fp["points"])
    rng.shuffle(points)
    used: set[str] = set()

    def fresh_point() -> str:
        while points:
            x, z = points.pop()
            rot, hor = rng.choice((0, 90, 180, 270)), rng.choice((0, 30, 60))
            name = f"loc|{int(round(x * 4))}|{int(round(z * 4))}|{rot}|{hor}"
            if name not in used:
                used.add(name)
                return name
        name = f"loc|{len(used) + 100}|0|0|0"
        used.add(name)
        return name

    loc_of: dict[str, str] = {}
    for ident in chosen:
        pose = fp["openable"].get(ident)
        cand = None
        if pose:
            cand = f"loc|{int(round(pose[0] * 4))}|{int(round(pose[1] * 4))}|{int(pose[2])}|{int(pose[3])}"
        if cand is not None and cand not in used:
            used.add(cand)
            loc_of[ident] = cand
        else:
            loc_of[ident] = fresh_point()
    return loc_of, fresh_point()


def _place_objects(fp: dict[str, Any], const: dict[str, Any], chosen: list[str], task_type: str, obj_t: str,
                   parent_t: str, lamp_host: str | None, num_receptacles: int, rng: random.Random
                   ) -> tuple[list[tuple[str, str]], str | None]:
    """(object id, receptacle id) for the target(s), the lamp and distractors of other types; and the lamp."""
    objects: list[tuple[str, str]] = []
    obj_taken: set[str] = set()

    def place(kind: str, exclude_kind: str = "") -> None:
        options = [c for c in chosen if kind in const["contains"].get(_kind(c), ()) and _kind(c) != exclude_kind]
        if options:
            objects.append((_new_id(kind, rng, obj_taken), rng.choice(options)))

    n_target = 2 if task_type == "pick_two_obj_and_place" else rng.choice((1, 1, 2))
    if task_type == "pick_two_obj_and_place":
        n_target += rng.choice((0, 0, 1))
    for _ in range(n_target):
        place(obj_t, exclude_kind=parent_t)
    lamp = None
    if lamp_host:
        lamp = _new_id(LAMP, rng, obj_taken)
        objects.append((lamp, lamp_host))
    others = [o for o in fp["object_types"]
              if o != obj_t and any(o in const["contains"].get(_kind(c), ()) for c in chosen)]
    for _ in range(rng.randint(num_receptacles // 2, num_receptacles) if others else 0):
        place(rng.choice(others))
    return objects, lamp


def _object_lines(const: dict[str, Any], chosen: list[str], objects: list[tuple[str, str]],
                  loc_of: dict[str, str], agent_loc: str, obj_t: str) -> list[str]:
    """The problem's `:objects`: the agent, every type, the objects, receptacles and locations."""
    obj_types = sorted({_kind(o) for o, _ in objects} | {obj_t})
    all_otypes = sorted(set(const["objects"]) - const["fixed"] | set(obj_types))
    lines = ["agent1 - agent"]
    lines += [f"{t}Type - otype" for t in all_otypes]
    lines += [f"{t}Type - rtype" for t in sorted(const["fixed"])]
    lines += [f"{_mangle(o)} - object" for o, _ in objects]
    lines += [f"{_mangle(r)} - receptacle" for r in chosen]
    lines += [f"{_mangle(loc)} - location" for loc in sorted(set(loc_of.values()) | {agent_loc})]
    return lines


def _init_facts(const: dict[str, Any], chosen: list[str], objects: list[tuple[str, str]], lamp: str | None,
                loc_of: dict[str, str], agent_loc: str, obj_t: str) -> list[str]:
    """The problem's `:init`: where everything is and what each thing affords."""
    obj_types = sorted({_kind(o) for o, _ in objects} | {obj_t})
    init = [f"(atLocation agent1 {_mangle(agent_loc)})"]
    for rt in sorted({_kind(r) for r in chosen}):
        init += [f"(canContain {rt}Type {ot}Type)" for ot in obj_types if ot in const["contains"].get(rt, ())]
    for r in chosen:
        init.append(f"(receptacleType {_mangle(r)} {_kind(r)}Type)")
        init.append(f"(receptacleAtLocation {_mangle(r)} {_mangle(loc_of[r])})")
        if _kind(r) in const["openable"]:
            init.append(f"(openable {_mangle(r)})")
    for o, r in objects:
        kind, mo = _kind(o), _mangle(o)
        init += [f"(objectType {mo} {kind}Type)", f"(inReceptacle {mo} {_mangle(r)})",
                 f"(objectAtLocation {mo} {_mangle(loc_of[r])})"]
        if o == lamp:
            init.append(f"(toggleable {mo})")
            continue
        init.append(f"(pickupable {mo})")
        init += [f"({flag.lower()} {mo})" for flag in ("Cleanable", "Heatable", "Coolable", "Sliceable")
                 if kind in const["actions"][flag]]
    return init


def game_key(**parts: Any) -> str:
    blob = json.dumps({"version": GENERATOR_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def generate_game(spec: dict[str, Any], root: str) -> dict[str, Any]:
    """Generate (or find cached) the game for `spec`; returns its meta record. Runs in a worker process.

    spec: key, task_type, floor_plans (candidates), num_receptacles, max_steps, seed (int). Attempts with
    derived seeds until the handcoded expert wins within `max_steps`; the first winner is kept.
    """
    meta_path = Path(root) / spec["key"] / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    from leap_dspy.envs.alfworld.expert import acquire_pddl_env, release_pddl_env

    domain = domain_path().read_text()
    grammar = grammar_path().read_text()
    Path(root).mkdir(parents=True, exist_ok=True)
    env = acquire_pddl_env()
    try:
        last_error = ""
        for attempt in range(200):
            meta, env, error = _attempt(spec, root, attempt, domain, grammar, env)
            last_error = error or last_error
            if meta is not None:
                return meta
        raise RuntimeError(f"no {spec['task_type']} game with {spec['num_receptacles']} receptacles that the handcoded "
                           f"expert wins within max_steps={spec['max_steps']} after 200 attempts: raise max_steps "
                           f"({last_error})")
    finally:
        release_pddl_env(env)


def _attempt(spec: dict[str, Any], root: str, attempt: int, domain: str, grammar: str,
             env: Any) -> tuple[dict[str, Any] | None, Any, str]:
    """One draw of the game from its derived seed: (its meta if the expert wins it, else None; the PddlEnv to go
    on with; why the draw failed, if it raised). The draft lives in a temporary folder until it is kept."""
    from leap_dspy.envs.alfworld.expert import play_expert

    rng = random.Random(f"{spec['seed']}:{spec['key']}:{attempt}")
    fp_num = rng.choice(spec["floor_plans"])
    problem, traj = build_problem(fp_num, spec["task_type"], spec["num_receptacles"], rng)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec['key']}.", dir=root))
    try:
        gamedata, game_file = _write_draft(tmp, problem, traj, domain, grammar)
        expert_seed = rng.randrange(2**31)
        try:
            won, commands, intro = play_expert(game_file, expert_seed, spec["max_steps"], env=env)
        except Exception as exc:  # a problem Fast Downward cannot ground counts as a failed draw
            error = f"{type(exc).__name__}: {exc}"
            return None, _fresh(env), error
        if not won:
            return None, env, ""
        gamedata["solvable"] = True
        gamedata["walkthrough"] = commands
        game_file.write_text(json.dumps(gamedata))
        meta = _meta(spec, fp_num, traj, expert_seed, commands, intro, attempt)
        return _publish(tmp, Path(root) / spec["key"], meta), env, ""
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_draft(tmp: Path, problem: str, traj: dict[str, Any], domain: str,
                 grammar: str) -> tuple[dict[str, Any], Path]:
    """Write the game's inputs and its unchecked `game.tw-pddl` (as alfworld-generate does); the expert loads it."""
    (tmp / "initial_state.pddl").write_text(problem)
    (tmp / "traj_data.json").write_text(json.dumps(traj, indent=1))
    gamedata = {
        "pddl_domain": domain,
        "grammar": grammar.replace("UNKNOWN GOAL", traj["goal_text"]),
        "pddl_problem": problem,
        "solvable": None,
        "walkthrough": None,
    }
    game_file = tmp / "game.tw-pddl"
    game_file.write_text(json.dumps(gamedata))
    return gamedata, game_file


def _meta(spec: dict[str, Any], fp_num: int, traj: dict[str, Any], expert_seed: int, commands: list[str],
          intro: str, attempt: int) -> dict[str, Any]:
    """The record the task list is built from, so that listing tasks never loads a game."""
    return {
        "key": spec["key"],
        "task_type": spec["task_type"],
        "floor_plan": f"FloorPlan{fp_num}",
        "pddl_params": traj["pddl_params"],
        "instruction": traj["goal_text"] + ".",
        "expert_seed": expert_seed,
        "expert_plan": commands,
        "intro_chars": len(intro),
        "attempts": attempt + 1,
    }


def _publish(tmp: Path, final: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Move the finished draft into place in one rename, so a reader never sees half a game."""
    meta_path = final / "meta.json"
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, final)
    except OSError:  # someone else finished the same game first
        if not meta_path.exists():
            raise
        return json.loads(meta_path.read_text())
    return meta


def _fresh(env: Any) -> Any:
    """A new engine in place of one an exception left in an unknown state (closed, not pooled)."""
    from leap_dspy.envs.alfworld.expert import acquire_pddl_env

    with contextlib.suppress(Exception):
        env.close()
    return acquire_pddl_env()


def _worker_main(argv: list[str]) -> None:
    """`python -m leap_dspy.envs.alfworld.generate SPECS.json ROOT INDEX COUNT`: one generation worker."""
    spec_file, root, index, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    specs = json.loads(Path(spec_file).read_text())
    for spec in specs[index::count]:
        generate_game(spec, root)


if __name__ == "__main__":
    import sys

    _worker_main(sys.argv[1:])
