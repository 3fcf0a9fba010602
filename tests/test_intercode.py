"""InterCode Bash and SQL: oracle success on the shipped tasks, sandbox attacks contained, backends agree.

Needs the data packages (`intercode-bench`, `icalfa`), bubblewrap and, for the MariaDB tests, a running server
with the Spider databases: .ci/services.sh installs and starts all of them. Tests skip, with the reason, only
where a tool is truly absent.
"""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from leap_dspy.envs import make_env
from leap_dspy.envs.intercode import InterCodeBash, InterCodeSQL, SandboxUnavailable
from leap_dspy.envs.intercode.bash_env import ungradable
from leap_dspy.envs.intercode.data import DataUnavailable, bench_bash
from leap_dspy.envs.intercode.reward import sql_reward, tfidf_similarity
from leap_dspy.envs.intercode.sandbox import check_bwrap
from leap_dspy.envs.intercode.sql_env import mysql_ready


def _need_data() -> None:
    try:
        bench_bash()
    except DataUnavailable as err:
        pytest.skip(str(err))


def _need_bwrap() -> None:
    _need_data()
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install -y bubblewrap; .ci/services.sh)")
    check_bwrap()  # installed but unusable is a failure, not a skip


def _need_mysql() -> None:
    _need_data()
    reason = mysql_ready()
    if reason is not None:
        pytest.skip(f"MariaDB not available: {reason}")


def _oracle(env, task) -> tuple[bool, float, int]:
    env.reset(task)
    steps, obs = 0, None
    while (action := env.oracle_action()) is not None and steps < 5:
        obs = env.step(action)
        steps += 1
    assert obs is not None
    return obs.success, obs.reward, steps


def _expert(env, tasks):
    from leap_dspy.programs import OracleExpert, Student
    from leap_dspy.rollout import expert_rollout

    return expert_rollout(OracleExpert(), Student(), env, tasks, level=env.default_privilege_level, num_threads=1)


def test_rewards_match_upstream_definitions():
    assert tfidf_similarity("a b", "a b") == 1.0  # no word of two characters: exact match
    assert tfidf_similarity("hello world", "hello world") == pytest.approx(1.0)
    assert sql_reward([(1,), (2,)], [(1,), (2,)]) == 1.0
    assert sql_reward([(2,), (1,)], [(1,), (2,)]) == -1.0  # upstream scales IoU by Kendall's tau
    assert sql_reward([(1,)], [(1,), (2,)]) == 0.5
    assert sql_reward("Error executing query: x", [(1,)]) == 0.0
    assert sql_reward([], []) == 1.0


def test_registry_and_splits():
    _need_bwrap()  # the splits leave out the tasks whose gold commands cannot grade, found by running them
    bash = make_env("intercode-bash", seed=3)
    assert isinstance(bash, InterCodeBash) and bash.config()["seed"] == 3
    # Tasks that cannot grade a student here are left out (on this image: 4 benchmark and 3 generated tasks
    # that doing nothing solves); which, the host decides (a program it lacks fails a gold command).
    unseen = Counter(t.source for t in bash.tasks("unseen"))
    assert set(unseen) == {"bench", "generated"} and 18 <= unseen["bench"] <= 24 and 30 <= unseen["generated"] <= 36
    assert ungradable(bash.tasks("unseen") + bash.tasks("seen"), {}) == {}
    assert len(bash.tasks("train")) > 150
    assert [t.id for t in bash.tasks("train")] == [t.id for t in bash.clone().tasks("train")]
    sql = make_env("intercode-sql")
    assert isinstance(sql, InterCodeSQL) and Counter(t.source for t in sql.tasks("unseen")) == {"bench": 23,
                                                                                                "generated": 70}
    train_dbs = {t.db for t in sql.tasks("train")}
    assert train_dbs.isdisjoint({t.db for t in sql.tasks("unseen")})  # unseen = held-out databases
    assert len(sql.tasks("train")) > 100 and sql.tasks("seen")


def test_sql_oracle_all_shipped_sqlite():
    _need_data()
    env = InterCodeSQL(backend="sqlite")
    results = [_oracle(env, t) for t in env.tasks("unseen")]
    assert all(ok for ok, _, steps in results), results
    assert all(steps == 2 for *_, steps in results)  # gold, then submit


def test_sql_privileged_levels_and_malformed_actions():
    _need_data()
    env = InterCodeSQL()
    task = env.tasks("unseen")[0]
    env.reset(task)
    assert env.privileged_state(0).sections == {}
    assert env.privileged_state(1).sections["gold query"] == task.gold
    assert "expected result" in env.privileged_state(2).sections
    for bad in ["", "   ", "SELEC * FRM", "\x00", "SELECT 1; SELECT 2", "DESCRIBE nosuchtable", "'; --", "🙂" * 50]:
        obs = env.step(bad)
        assert isinstance(obs.text, str) and not obs.done
    assert env.step("SHOW TABLES").text.startswith("[(")
    assert env.step("submit").done


def test_sql_notes_keep_what_the_database_showed():
    _need_data()
    env = InterCodeSQL()
    task = next(t for t in env.tasks("unseen") if t.db == "pets_1")
    assert env.reset(task).notes == "Tables: not listed yet"
    env.step("SHOW TABLES")
    env.step("DESCRIBE pets")
    notes = env.step("SELECT nosuch FROM pets").notes or ""
    assert notes.splitlines()[0] == "Tables: has_pet, pets, student"
    assert "Columns of pets: PetID, PetType, pet_age, weight" in notes  # kept after the description scrolled
    assert notes.endswith("Last command: SELECT nosuch FROM pets (an error)")
    assert InterCodeSQL(notes=False).reset(task).notes is None
    env.close()


def test_sql_attacks_sqlite():
    _need_data()
    from leap_dspy.envs.intercode.attacks import run_sql_attacks

    results = run_sql_attacks("sqlite", timeout_s=1.0)
    assert all(r.contained for r in results), [(r.name, r.detail) for r in results]


def test_sql_generated_tasks_solvable():
    _need_data()
    env = InterCodeSQL()
    tasks = env.tasks("train")[:15]
    assert all(_oracle(env, t)[0] for t in tasks)


def _r(v: object) -> object:
    return round(v, 9) if isinstance(v, float) else v  # a sum's last bits depend on the order it adds in


def test_sql_generated_answers_do_not_depend_on_the_order_rows_are_stored():
    """A gold query whose answer changes when the rows are stored in reverse (a LIMIT cutting through a tie)
    grades by the engine's whim, and MySQL and SQLite disagree on it."""
    import dataclasses
    import random
    import sqlite3

    from leap_dspy.envs.intercode import spider

    _need_data()
    for db, tables in sorted(spider.parse_dump().items()):
        stores = []
        for rows in (lambda r: r, lambda r: r[::-1]):
            conn = sqlite3.connect(":memory:")
            spider.load_tables(conn, {n: dataclasses.replace(t, rows=rows(t.rows)) for n, t in tables.items()})
            stores.append(conn)
        for question, gold in spider.generate_questions(db, tables, random.Random(0)):
            a, b = (sorted(repr([_r(v) for v in row]) for row in c.execute(gold).fetchall()) for c in stores)
            assert a == b, (db, question, gold)


def test_sql_unseen_task_sets_share_training_and_the_benchmark_databases():
    _need_data()
    default, new = InterCodeSQL(seed=1), InterCodeSQL(seed=1, task_set="new-databases")
    shipped = InterCodeSQL(seed=1, task_set="shipped")
    assert [t.id for t in new.tasks("train")] == [t.id for t in default.tasks("train")]  # training unchanged
    assert [t.id for t in shipped.tasks("seen")] == [t.id for t in default.tasks("seen")]
    unseen = new.tasks("unseen")
    assert [t.id for t in default.tasks("unseen")] == [t.id for t in shipped.tasks("unseen") + unseen]
    bench_dbs = {t.db for t in shipped.tasks("unseen")} - {"wta_1"}  # no template fits wta_1
    assert {t.db for t in unseen} == bench_dbs
    assert {t.db for t in new.tasks("train")}.isdisjoint(t.db for t in unseen)
    assert max(Counter(t.db for t in unseen).values()) == 10 and len(unseen) >= 60
    assert [t.id for t in InterCodeSQL(seed=1, task_set="new-databases").tasks("unseen")] == [t.id for t in unseen]
    assert [t.id for t in InterCodeSQL(seed=2, task_set="new-databases").tasks("unseen")] != [t.id for t in unseen]
    assert all(_oracle(new, t)[0] for t in unseen[::7])


def test_mysql_oracle_and_agreement_with_sqlite():
    _need_mysql()
    lite, maria = InterCodeSQL(backend="sqlite"), InterCodeSQL(backend="mysql")
    for task in lite.tasks("unseen"):
        assert _oracle(maria, task)[0], task.id
        a = (lite.reset(task), lite._gold())[1]
        b = (maria.reset(task), maria._gold())[1]
        # the same rows; four gold queries have no ORDER BY, and the two engines return those in another order
        assert sorted(map(str, a)) == sorted(map(str, b)), task.id
    maria.close()


def test_sql_attacks_mysql():
    _need_mysql()
    from leap_dspy.envs.intercode.attacks import run_sql_attacks

    results = run_sql_attacks("mysql", timeout_s=1.0)
    assert all(r.contained for r in results), [(r.name, r.detail) for r in results]


# not bench-11: doing nothing solves it, so it is left out of the split
BASH_SUBSET = ["bench-0", "bench-1", "bench-3", "bench-6", "bench-12", "bench-13", "bench-16", "bench-22"]


def test_bash_oracle_representative_subset():
    _need_bwrap()
    env = InterCodeBash()
    tasks = [t for t in env.tasks("unseen") if t.id in BASH_SUBSET]
    assert len(tasks) == len(BASH_SUBSET)
    results = {t.id: _oracle(env, t) for t in tasks}
    env.close()
    assert all(ok for ok, *_ in results.values()), results


def test_bash_generated_file_systems_are_new_to_unseen_and_the_expert_solves_them():
    """Unseen generated tasks live on file systems whose root no training task names; the shipped task set
    is what `default` was; the expert solves the generated tasks, finding a file the task names by name alone
    without guessing its folder, and its reasons pass the realizability check."""
    from leap_dspy.envs.intercode import filesystems
    from leap_dspy.realizability import unobserved_mentions

    _need_bwrap()
    env, shipped = InterCodeBash(seed=1), InterCodeBash(seed=1, task_set="shipped")
    assert filesystems.file_system(3) == filesystems.file_system(3)  # drawn from its number alone
    new = [t for t in env.tasks("unseen") if t.source == "generated"]
    assert not [t.instruction for t in new + env.tasks("train") if "the file the file" in t.instruction]
    assert [t.id for t in env.tasks("unseen")] == [t.id for t in shipped.tasks("unseen") + new]
    assert {t.id for t in shipped.tasks("train")} < {t.id for t in env.tasks("train")}
    roots = {word.split("/")[1] for t in new for word in t.gold.split() if word.startswith("/")}
    trained = " ".join(t.instruction + " " + t.gold for t in env.tasks("train") + env.tasks("seen"))
    assert roots and not any(f"/{root}/" in trained for root in roots)
    tasks = new[::3] + [t for t in env.tasks("train") if t.source == "generated"][:6]
    env.reset(tasks[0])
    assert env.privileged_state(2).sections["expected output"]  # every level, on every kind of task
    trajectories = _expert(env, tasks)
    assert all(t.success for t in trajectories), [(t.task.id, [s.action for s in t.steps]) for t in trajectories]
    assert not [m for t in trajectories for s in t.steps if (m := unobserved_mentions(s.reason, s.inputs,
                                                                                      s.privileged, s.action))]
    for t in trajectories:
        actions = [s.action for s in t.steps]
        if "somewhere under" in t.task.instruction:
            assert actions[0].startswith("find ") and " -name " in actions[0], actions
        else:
            assert actions == [t.task.gold, "submit"]


def test_bash_wrong_answer_scores_less_and_malformed_actions():
    _need_bwrap()
    env = InterCodeBash()
    task = next(t for t in env.tasks("unseen") if t.id == "bench-12")  # rename .txt -> .md
    env.reset(task)
    for bad in ["", "\x00", "((((", "cd /nonexistent", "cd", "'unterminated", "exit 3", "kill -9 -1"]:
        obs = env.step(bad)
        assert isinstance(obs.text, str)
    assert env.privileged_state(1).sections["gold command"] == task.gold
    assert "expected file changes" in env.privileged_state(2).sections
    obs = env.step("submit")
    assert obs.done and not obs.success and obs.reward < 1
    env.reset(task)
    env.step("cd /testbed")
    assert env.step("pwd").text.strip() == "/testbed"
    env.close()


def test_bash_sandbox_unavailable_message(monkeypatch):
    from leap_dspy.envs.intercode import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        sandbox.Sandbox()


def test_bash_attacks_contained():
    _need_bwrap()
    from leap_dspy.envs.intercode.attacks import run_bash_attacks

    results = run_bash_attacks(wall_s=3.0)
    assert len(results) == 8
    assert all(r.contained for r in results), [(r.name, r.detail) for r in results]


def test_your_own_tasks_replace_the_splits_they_name(tmp_path):
    """`task_file`: InterCode's own record format (query, gold; SQL's db), as JSON, JSON lines or CSV."""
    _need_data()
    import json

    from leap_dspy.envs.check import check_env

    mine = tmp_path / "mine.jsonl"
    mine.write_text("\n".join(json.dumps(r) for r in [
        {"query": "How many pets are there?", "gold": "SELECT count(*) FROM Pets", "db": "pets_1"},
        {"query": "List the pet types.", "gold": "SELECT DISTINCT PetType FROM Pets", "db": "pets_1"},
        {"query": "How many students are there?", "gold": "SELECT count(*) FROM Student", "db": "pets_1",
         "split": "train"}]))
    env = make_env("intercode-sql", task_file=str(mine))
    default = make_env("intercode-sql")
    assert [t.id for t in env.tasks("unseen")] == ["file-mine-0", "file-mine-1"]
    assert [t.id for t in env.tasks("train")] == ["file-mine-2"]
    assert [t.id for t in env.tasks("seen")] == [t.id for t in default.tasks("seen")]  # not named: the task set's
    assert all(_oracle(env, t)[0] for t in env.tasks("unseen")) and check_env(env, env.tasks("train")[0]) == []
    played = _expert(env, env.tasks("unseen"))  # the realizable expert looks first, then answers
    assert all(t.success for t in played) and all(t.steps[0].action == "SHOW TABLES" for t in played)

    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("query,gold,db\nHow many pets are there?,SELECT count(*) FROM Pets,pets_1\n")
    assert [t.gold for t in make_env("intercode-sql", task_file=str(csv_file)).tasks("unseen")] == [
        "SELECT count(*) FROM Pets"]
    for records, says in [([{"query": "q", "db": "pets_1"}], "task 0: no gold"),
                          ([{"query": "q", "gold": "SELECT 1", "db": "nowhere"}], "nowhere are not Spider databases"),
                          ([{"query": "q", "gold": "SELECT 1", "db": "pets_1", "split": "dev"}], "split 'dev'"),
                          ({"query": "q"}, "a non-empty list"),
                          # a gold no query can match, and one any empty answer matches
                          ([{"query": "q", "gold": "SELECT nope FROM Pets", "db": "pets_1"}],
                           "task 0: its gold query fails on pets_1"),
                          ([{"query": "q", "gold": "SELECT PetID FROM Pets WHERE 1 = 0", "db": "pets_1"}],
                           "task 0: its gold query returns no rows"),
                          # a question asked twice: graded after training on it, or weighed twice
                          ([{"query": "How many pets?", "gold": "SELECT count(*) FROM Pets", "db": "pets_1",
                             "split": "train"},
                            {"query": "How many  pets?", "gold": "SELECT count(PetID) FROM Pets", "db": "pets_1"}],
                           "task 1: the same task as task 0, in train and again in unseen"),
                          ([{"query": "q", "gold": "SELECT 1", "db": "pets_1"}] * 2, "task 1: .* twice in unseen")]:
        (tmp_path / "bad.json").write_text(json.dumps(records))
        with pytest.raises(ValueError, match=says):
            make_env("intercode-sql", task_file=str(tmp_path / "bad.json"))


def test_your_own_bash_tasks_on_your_own_file_system(tmp_path, monkeypatch):
    _need_bwrap()
    import json

    (tmp_path / "fs").mkdir()
    setup = tmp_path / "fs" / "setup.sh"
    setup.write_text("mkdir -p /data/logs && echo error > /data/logs/a.log && echo ok > /data/logs/b.log\n")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps([{"query": "Count the log files that contain the word error.",
                                 "gold": "grep -l error -r /data | wc -l", "setup": "fs/setup.sh"}]))
    env = make_env("intercode-bash", task_file=str(mine))  # the setup's path is the task file's, not the cwd's
    task = env.tasks("unseen")[0]
    assert task.id == "file-mine-0" and _oracle(env, task)[:2] == (True, 1.0)
    [played] = _expert(env, [task])
    assert played.success and played.steps[0].action.startswith("ls")  # /data: a path it has not seen yet
    env.reset(task)
    assert env.step("ls /data/logs").text.split() == ["a.log", "b.log"]  # the file system the setup built

    # A misspelt shipped setup is named when the file loads (every episode on it failed), and so is a setup that
    # exits non-zero, with its last line (its tasks would be graded on half a file system).
    mine.write_text(json.dumps([{"query": "q", "gold": "ls", "setup": "intercode:setup_fss.sh"}]))
    with pytest.raises(ValueError, match="setup intercode:setup_fss.sh is not a shipped setup script"):
        make_env("intercode-bash", task_file=str(mine))
    mine.write_text(json.dumps([{"query": "q", "gold": "ls", "setup": "fs"}]))
    with pytest.raises(ValueError, match="fs is a folder, not a script"):
        make_env("intercode-bash", task_file=str(mine))
    (tmp_path / "fs" / "full.sh").write_text("mkdir -p /data\necho disk full >&2\nexit 3\n")
    mine.write_text(json.dumps([{"query": "q", "gold": "ls /data", "setup": "fs/full.sh"}]))
    with pytest.raises(ValueError, match="full.sh failed \\(exit code 3\\): disk full$"):
        make_env("intercode-bash", task_file=str(mine))
    # A gold command that fails on its file system grades an error message; one whose effect the grader cannot
    # see (an empty folder) or that prints nothing grades doing nothing: both are named as the file loads.
    for gold, says in [("cat /data/logs/c.log", "task 0: its gold command fails here \\(exit code 1: cat: "),
                       ("mkdir /data/new", "task 0: doing nothing earns its gold command's full reward")]:
        mine.write_text(json.dumps([{"query": "q", "gold": gold, "setup": "fs/setup.sh"}]))
        with pytest.raises(ValueError, match=says):
            make_env("intercode-bash", task_file=str(mine))

    # A file that names every split replaces the whole task set, which is then never built (nor checked).
    golds = {"train": "ls /data/logs | wc -l", "seen": "cat /data/logs/b.log", "unseen": "grep -l ok -r /data"}
    mine.write_text(json.dumps([{"query": f"q{i}", "gold": gold, "setup": "fs/setup.sh", "split": split}
                                for i, (split, gold) in enumerate(golds.items())]))
    env = make_env("intercode-bash", task_file=str(mine))
    monkeypatch.setattr(env, "_build_splits", lambda: pytest.fail("built the task set the file replaces"))
    assert [[t.gold for t in env.tasks(split)] for split in golds] == [[gold] for gold in golds.values()]
