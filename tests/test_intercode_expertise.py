"""InterCode's scripted experts: they look before they act, solve the tasks at the default privilege level,
and give reasons that the realizability check passes, while reasons that leak privileged facts are flagged.

Real components throughout: SQLite Spider databases (and MariaDB where .ci/services.sh started it), Bash in
bubblewrap sandboxes. Tests skip, with the reason, only where a tool is truly absent.
"""

from __future__ import annotations

import re

import pytest
from test_intercode import _need_bwrap, _need_data

from leap_dspy.envs.intercode import InterCodeBash, InterCodeSQL
from leap_dspy.envs.intercode.data import bench_bash
from leap_dspy.envs.intercode.expertise import (
    BashExpertise,
    bash_paths,
    cue,
    describe_target,
    noted_columns,
    programs,
    sql_names,
)
from leap_dspy.envs.intercode.sql_env import mysql_ready
from leap_dspy.programs import OracleExpert, Student
from leap_dspy.realizability import unobserved_mentions
from leap_dspy.rollout import expert_rollout
from leap_dspy.types import PrivilegedState, StudentInputs, Trajectory


def _play(env, tasks) -> list[Trajectory]:
    return expert_rollout(OracleExpert(), Student(), env, tasks, level=env.default_privilege_level, num_threads=1)


def _flags(trajectories: list[Trajectory]) -> list[tuple[str, list[str]]]:
    return [(s.reason, m) for t in trajectories for s in t.steps
            if (m := unobserved_mentions(s.reason, s.inputs, s.privileged, s.action))]


def test_name_parsers():
    tables, columns = sql_names("SELECT T1.fname, count(*) AS n FROM Student AS T1 JOIN Has_Pet AS T2 "
                                "ON T1.stuid = T2.stuid WHERE T1.sex = 'F' GROUP BY T1.fname")
    assert tables == ["Student", "Has_Pet"]
    assert columns == {"Student": ["fname", "stuid", "sex"], "Has_Pet": ["stuid"]}
    assert sql_names("SELECT `Title` FROM `song` ORDER BY `Highest_Position` DESC LIMIT 1") == (
        ["song"], {"song": ["Title", "Highest_Position"]})
    assert bash_paths("sort -r /testbed/dir1/a.txt > /testbed/out.txt") == ["/testbed/dir1/a.txt"]
    assert bash_paths("find /testbed -name '*.py' -exec cat {} \\; | wc -l 2>/dev/null") == ["/testbed"]


def test_default_levels_have_a_scripted_policy():
    for env in (InterCodeSQL(), InterCodeBash()):
        assert env.default_privilege_level in env.expertise().levels
        assert 0 not in env.expertise().levels


@pytest.mark.parametrize("backend", ["sqlite", "mysql"])
def test_sql_expert_explores_then_solves(backend):
    _need_data()
    if backend == "mysql" and (reason := mysql_ready()) is not None:
        pytest.skip(f"MariaDB not available: {reason}")
    env = InterCodeSQL(backend=backend)
    tasks = env.tasks("unseen")[:12] + env.tasks("train")[:8]
    trajectories = _play(env, tasks)
    assert sum(t.success for t in trajectories) >= 0.9 * len(tasks)
    assert not _flags(trajectories)
    # the prose's "the visitor table" is not the table's name: every episode lists the tables first
    assert all(t.steps[0].action == "SHOW TABLES" for t in trajectories)
    joined = next(t for t in trajectories if " JOIN " in t.task.gold)  # names it cannot guess: it looks first
    actions = [s.action for s in joined.steps]
    assert actions[0] == "SHOW TABLES" and actions[1].startswith("DESCRIBE ") and actions[-1] == "submit"
    # each reason first reads the notes, then decides: the student copies the first part and reads its action off it
    describe, query = joined.steps[1].reason, joined.steps[-2].reason
    assert joined.steps[0].reason.startswith("Tables: not listed yet. ")
    assert describe.startswith(f"Columns of {describe_target(actions[1])}: not described yet. ")
    assert query.startswith("Columns of ") and " include " in query.split(".")[0] and "question asks" in query
    for table, names in re.findall(r"Columns of (\w+) include ([^.]+)\.", query):  # as the notes list them
        noted = noted_columns(joined.steps[-2].inputs, table)
        assert noted is not None and set(names.split(", ")) <= set(noted), (table, names, noted)


def test_sql_questions_name_entities_and_the_expert_maps_them_to_listed_tables():
    _need_data()
    env = InterCodeSQL()
    questions = env.tasks("train") + env.tasks("seen")
    # Spider's questions never say which table: neither may the generated ones, or the student learns to copy
    named = [t.instruction for t in questions for table in sql_names(t.gold)[0]
             if re.search(rf"\b{table.replace('_', ' ')} table\b", t.instruction, re.I)]
    assert not named, named[:3]
    clauses = ("JOIN", "WHERE", "GROUP BY", "ORDER BY", "DISTINCT")
    assert all(any(k in t.gold for t in questions) for k in clauses)  # each kind of query is taught
    trajectories = _play(env, env.tasks("train")[:10] + env.tasks("unseen")[:3])
    looks = [s for t in trajectories for s in t.steps if s.action.startswith("DESCRIBE ")]
    # "The question is about students, and Student is the table for them": the question's own word, matched
    mapped = [s for s in looks if "The question is about" in s.reason]
    assert len(mapped) >= len(looks) // 2, [s.reason for s in looks]
    for step in mapped:
        words = step.reason.split("The question is about ", 1)[1].split(",")[0].lower().split()
        assert all(w in step.inputs.task.lower() for w in words), step.reason


def test_sql_questions_across_links_take_spiders_shapes_and_the_expert_solves_them():
    _need_data()
    env = InterCodeSQL()
    questions = env.tasks("train") + env.tasks("seen")
    shapes = {"INTERSECT": "both", "NOT IN": "do not have", "ORDER BY count(*) DESC LIMIT 1": "the most"}
    picked = []
    for clause, words in shapes.items():
        found = [t for t in questions if clause in t.gold]
        assert len(found) >= 10, clause  # a shape seen a handful of times teaches nothing
        assert all(words in t.instruction for t in found), clause
        picked += found[:4]
    three = [t for t in questions if len(sql_names(t.gold)[0]) == 3]  # entity, link table, entity
    assert len(three) >= 20
    trajectories = _play(env, picked + three[:4])
    assert all(t.success for t in trajectories), [t.task.instruction for t in trajectories if not t.success]
    assert not _flags(trajectories)
    # the names of a join it cannot guess: it lists the tables and looks one up before the query
    for t in trajectories:
        actions = [s.action for s in t.steps]
        assert actions[0] == "SHOW TABLES" and actions[1].startswith("DESCRIBE ") and actions[-1] == "submit"


def test_the_repetition_guard_lets_the_student_write_an_intersect(tokenizer_source):
    """An INTERSECT's two halves say one long run of tokens twice: the guard must allow that, or no student
    could ever write the query a "both" question asks for (it forbade any 12-token run said twice)."""
    _need_data()
    from collections import Counter

    from leap_dspy.config import LEAPConfig
    from leap_dspy.lm.models import load_tokenizer

    env, lm, tokenizer = InterCodeSQL(), LEAPConfig().lm, load_tokenizer(tokenizer_source)
    both = [t for t in env.tasks("train") if "INTERSECT" in t.gold][:6]
    most = []
    for step in (s for t in _play(env, both) for s in t.steps):
        ids = tokenizer.encode(f"{step.reason}\n\n{step.action}", add_special_tokens=False)
        grams = Counter(tuple(ids[i:i + lm["no_repeat_ngram"]]) for i in range(len(ids) - lm["no_repeat_ngram"] + 1))
        most.append(max(grams.values(), default=0))
    assert max(most) == 2 <= lm["ngram_repeats"]  # said twice, never three times


def test_bash_expert_looks_then_solves():
    _need_bwrap()
    env = InterCodeBash()
    tasks = [t for t in env.tasks("unseen") if t.id in {"bench-3", "bench-8", "bench-21", "bench-23"}]
    # bench-18 is left out of the splits (doing nothing passes it), but its gold runs over two lines
    tasks += [env._task(record, "unseen") for record in bench_bash() if record.index == 18]
    trajectories = _play(env, tasks + env.tasks("train")[:6])
    assert sum(t.success for t in trajectories) >= len(trajectories) - 1
    assert not _flags(trajectories)
    by_id = {t.task.id: [s.action for s in t.steps] for t in trajectories}
    # the task names the file, not its folder: the expert finds it rather than guess which folder to list
    assert by_id["bench-21"][:3] == ["ls /", "find /testbed -name jsonfile1.json",
                                     "cat /testbed/dir1/subdir1/jsonfile1.json | jq ."]
    assert by_id["bench-8"] == ["ls -lhS /testbed/dir1", "submit"]  # the instruction names every path
    assert by_id["bench-18"][-1] == "submit"  # a gold command over two lines is recognised as run


def test_bash_reasons_cite_the_words_that_call_for_each_program():
    expertise = BashExpertise()
    task = "Count the lines of /testbed/notes.txt that contain the word 'error'"
    inputs = StudentInputs(task=task, observation=task, history="(none)")
    command = "grep 'error' /testbed/notes.txt | wc -l"
    assert programs(command) == ["grep", "wc"] and programs("find / -name '*.sh' | xargs md5sum") == [
        "find", "xargs", "md5sum"]
    assert (cue(task, "grep"), cue(task, "wc"), cue(task, "find")) == ("contain", "Count", "")
    assert cue("Compute the md5 hash of every file", "md5sum") == "md5"
    assert cue("list open files", "ls") == "list" and cue("also", "ls") == ""  # names match as whole words
    reason = expertise.explain_step(inputs, PrivilegedState(level=1), command, command)
    assert '"contain" calls for grep, "Count" for wc.' in reason
    assert reason.endswith("One command, grep | wc, does that.")
    # find out of habit is told apart from find that the instruction asks for
    contrast = expertise.explain(inputs, PrivilegedState(level=1, sections={"gold command": command}), command,
                                 "find /testbed -name notes.txt")
    assert contrast.endswith(" Yours runs find, which no word of the instruction asks for.")
    assert "Yours runs" not in expertise.contrast(inputs, command, "grep error /testbed/notes.txt")
    found = StudentInputs(task="Find the empty files under /testbed", observation="", history="(none)")
    assert expertise.contrast(found, "find /testbed -empty", "find /testbed -type f") == ""
    assert cue("Display the number of sub-directories under /system", "find") == "sub-directories"
    assert programs("address=$(dig +short x.com | grep -E '^(1|2)' | head -n 1) && echo $address") == [
        "dig", "grep", "head", "echo"]  # an assignment runs no program; quotes keep their | whole
    assert programs("wc -l < /x/a.txt 2>&1 | tar -czf b.tgz `find . -mtime -1`") == ["wc", "tar", "find"]


def test_bash_reasons_keep_the_instruction_where_the_expected_output_uses_their_words():
    """A file's lines or names ("names.conf") may hold the words a reason is made of ("It names /lab"); the
    check reads them as the environment's vocabulary, so the reason keeps the instruction it restates."""
    _need_bwrap()
    env = InterCodeBash(seed=1)
    ids = {"nl2bash_fs_1-43", "nl2bash_fs_2-35", "gen-fs6-9"}  # flagged in the published grid's demonstrations
    tasks = [t for split in ("train", "seen", "unseen") for t in env.tasks(split) if t.id in ids]
    assert len(tasks) == len(ids)
    known = env.expertise().vocabulary
    for t in expert_rollout(OracleExpert(), Student(), env, tasks, level=2, num_threads=1):
        command = t.steps[0]
        assert command.reason.startswith("The instruction asks: "), command.reason
        assert not [m for s in t.steps if (m := unobserved_mentions(s.reason, s.inputs, s.privileged, s.action,
                                                                   known=known))]


def _start(env, task_id: str, level: int):
    task = next(t for t in env.tasks("unseen") if t.id == task_id)
    obs = env.reset(task)
    inputs = StudentInputs(task=task.instruction, observation=obs.text, history="(none)")
    return task, inputs, env.privileged_state(level)


def test_sql_leaks_are_flagged_and_unjustified():
    _need_data()
    env = InterCodeSQL()
    task, inputs, privileged = _start(env, "bench-4", 2)  # pets_1: Student, Has_Pet, Pets
    expertise = env.expertise()
    try:
        for leak in (f"The answer is {task.gold}.",  # the gold query
                     "I join Has_Pet to Pets on petid.",  # tables and columns never listed
                     "Filter on T3.pettype and T3.pet_age.",  # columns never described (as the gold writes them)
                     f"The result should be {privileged.sections['expected result']}."):  # expected rows
            assert unobserved_mentions(leak, inputs, privileged, "SHOW TABLES"), leak
        assert expertise.act(inputs, privileged, "") == "SHOW TABLES"
        assert "has_pet" in (expertise.unjustified(inputs, privileged, task.gold) or "").lower()
        assert expertise.unjustified(inputs, privileged, "SHOW TABLES") is None
        reason = expertise.explain(inputs, privileged, "SHOW TABLES")
        assert not unobserved_mentions(reason, inputs, privileged, "SHOW TABLES")
        listing = env.step("SHOW TABLES").text
        inputs = StudentInputs(task=task.instruction, observation=listing,
                               history=f"Start: {task.instruction}\nSHOW TABLES -> {listing}")
        action = expertise.act(inputs, privileged, "")
        assert action.startswith("DESCRIBE ")
        # looking up a listed table is not a guess; a table the listing never showed is
        assert "Yours names" not in expertise.explain(inputs, privileged, action, "DESCRIBE has_pet")
        assert "Yours names" in expertise.explain(inputs, privileged, action, "SELECT * FROM owners")
    finally:
        env.close()


def test_bash_leaks_are_flagged_and_unjustified():
    _need_bwrap()
    env = InterCodeBash()
    task, inputs, privileged = _start(env, "bench-21", 2)  # jsonfile1.json, in /testbed/dir1/subdir1
    expertise = env.expertise()
    try:
        for leak in (f"Run {task.gold}.",  # the gold command
                     "The file is /testbed/dir1/subdir1/jsonfile1.json.",  # an unseen path
                     f"It prints {privileged.sections['expected output'][:60]}"):  # the expected output
            assert unobserved_mentions(leak, inputs, privileged, "ls /"), leak
        assert "jsonfile1" in (expertise.unjustified(inputs, privileged, task.gold) or "")
        assert expertise.act(inputs, privileged, "cat jsonfile1.json") == "ls /"
        assert expertise.act(inputs, privileged, "submit") == "ls /"
        reason = expertise.explain(inputs, privileged, "ls /", "submit")
        assert "Submitting now" in reason and not unobserved_mentions(reason, inputs, privileged, "ls /")
    finally:
        env.close()


def test_sql_expert_looks_again_when_a_description_left_the_prompt():
    _need_data()
    env = InterCodeSQL()
    def one_table(gold: str) -> bool:  # and no column named as a table, which SHOW TABLES would show
        tables, columns = sql_names(gold)
        selected = gold.lower().split("from")[0]
        return len(tables) == 1 and bool(columns.get(tables[0])) and tables[0].lower() not in selected

    task = next(t for t in env.tasks("train") if "count(*)" not in t.gold and one_table(t.gold))
    table = sql_names(task.gold)[0][0]
    env.reset(task)
    listing = env.step("SHOW TABLES").text
    privileged = env.privileged_state(1)
    expertise = env.expertise()
    try:
        # DESCRIBE ran three steps ago: the prompt names the action, but its output has scrolled away
        history = (f"Start: {task.instruction}\nEarlier: SHOW TABLES; DESCRIBE {table}\n"
                   f"SELECT 1 -> [(1,)]\nSHOW TABLES -> {listing}")
        inputs = StudentInputs(task=task.instruction, observation=listing, history=history)
        assert expertise.act(inputs, privileged, "submit") == f"DESCRIBE {table}"
        described = env.step(f"DESCRIBE {table}").text
        inputs = StudentInputs(task=task.instruction, observation=described,
                               history=f"{history}\nDESCRIBE {table} -> {described[:120]}")
        assert expertise.act(inputs, privileged, "submit") == task.gold  # now in view: the query
    finally:
        env.close()
