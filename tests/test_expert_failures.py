"""A misbehaving OpenAI-compatible expert behind LEAP's correction step.

A stdlib HTTP server on 127.0.0.1 plays the remote expert: it answers 500s, bodies that are not JSON, empty
content, answers too slow for the client's timeout, an inadmissible or empty action, or fails once and then
answers. The expert is a real `PrivilegedExpert` over a LiteLLM-routed `dspy.LM`; the student's trajectories
come from real rollouts of the tiny random model in a tiny ALFWorld. `LEAP._correct` must finish in bounded
time, write one record per visited step, record failures as dropped with their reason, and keep what the
log held before.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download attempts (offline)

import dspy  # noqa: E402
import pytest  # noqa: E402

from leap_dspy.envs.alfworld import ALFWorld  # noqa: E402
from leap_dspy.lm import local_lm  # noqa: E402
from leap_dspy.metrics import expert_usage_metrics, token_cost_usd  # noqa: E402
from leap_dspy.programs import PrivilegedExpert, Student  # noqa: E402
from leap_dspy.rollout import rollout  # noqa: E402
from leap_dspy.serve import make_server  # noqa: E402
from leap_dspy.store import JsonlLog  # noqa: E402
from leap_dspy.teleprompt import LEAP  # noqa: E402
from leap_dspy.types import Correction, Trajectory  # noqa: E402

CLIENT_TIMEOUT_S = 1.0
LITELLM_RETRIES = 1
EXPERT_RETRIES = 2


def chat_answer(reason: str, action: str) -> str:
    return f"[[ ## reason ## ]]\n{reason}\n\n[[ ## action ## ]]\n{action}\n\n[[ ## completed ## ]]"


class BadExpertHandler(BaseHTTPRequestHandler):
    server: BadExpertServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        mode = self.server.mode
        with self.server.lock:
            self.server.requests += 1
            first_time = body not in self.server.seen
            self.server.seen.add(body)
        if mode == "500" or (mode == "flaky" and first_time):
            self.reply(500, json.dumps({"error": {"message": "boom", "type": "server_error", "param": None,
                                                  "code": None}}).encode())
        elif mode == "invalid_json":
            self.reply(200, b'{"id": "x", "choices": [ this is not json')
        elif mode == "empty" or (mode == "unparsable_once" and first_time):
            self.reply(200, completion(""))
        elif mode == "slow":
            self.server.release.wait(CLIENT_TIMEOUT_S * 5)
            self.reply(200, completion(chat_answer("late", "look")))
        elif mode == "inadmissible":
            self.reply(200, completion(chat_answer("Flying is faster.", "fly to the moon")))
        elif mode == "empty_action":
            self.reply(200, completion(chat_answer("I am not sure.", "")))
        elif mode == "trajectory":  # a whole-trajectory answer that fixes step 0 and skips the others
            fixes = [{"step": 0, "reason": "I look around first.", "action": "look"},
                     {"step": 7, "reason": "A step that was never taken.", "action": "look"}]
            self.reply(200, completion(f"[[ ## corrections ## ]]\n{json.dumps(fixes)}\n\n[[ ## completed ## ]]"))
        else:  # "ok", and "flaky" after its first failure
            self.reply(200, completion(chat_answer("I look around first.", "look")))

    def reply(self, status: int, data: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


def completion(content: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bad", "object": "chat.completion", "created": int(time.time()), "model": "bad-expert",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }).encode()


class BadExpertServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), BadExpertHandler)
        self.mode = "ok"
        self.requests = 0
        self.seen: set[bytes] = set()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def reset(self, mode: str) -> None:
        with self.lock:
            self.mode, self.requests, self.seen = mode, 0, set()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture(scope="module")
def bad_server() -> Iterator[BadExpertServer]:
    server = BadExpertServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ALFWorld:
    return ALFWorld(num_receptacles=5, task_types=["pick_and_place_simple"], num_train=2, num_seen=1,
                    num_unseen=1, max_steps=10, cache_dir=str(tmp_path_factory.mktemp("alfworld-cache")))


@pytest.fixture(scope="module")
def trajectories(env: ALFWorld, tiny_model: str) -> dict[str, Trajectory]:
    """The tiny student's real rollouts, with the privileged state captured for an LM expert."""
    student = Student()
    student.set_lm(local_lm(tiny_model, max_new_tokens=16))
    with dspy.context(adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        played = rollout(student, env, env.tasks("train"), num_threads=2, max_steps=2,
                         capture_level=env.default_privilege_level, policy="student@0")
    return {t.task.id: t for t in played}


def expert_for(server: BadExpertServer, per: str = "step") -> PrivilegedExpert:
    return PrivilegedExpert("openai/bad-expert", api_base=server.api_base, api_key="x", engine="litellm",
                            num_retries=LITELLM_RETRIES, timeout=CLIENT_TIMEOUT_S, cache=False, max_tokens=64,
                            per=per)


def correct(env: ALFWorld, model: str, run_dir: Path, server: BadExpertServer, mode: str,
            trajectories: dict[str, Trajectory], earlier: list[Correction] = (), per: str = "step"
            ) -> tuple[dict[str, Correction], float, str | None]:
    """The round's records, its seconds, and why it stopped once every step was asked (an endpoint that never
    answered: a finished round is never asked again, so it must not train without them), if it did."""
    from leap_dspy.rollout import ExpertUnavailable

    leap = LEAP(env, model=model, run_dir=run_dir, expert_retries=EXPERT_RETRIES, expert_threads=4,
                progress=False)
    log = JsonlLog(run_dir / "iter_1" / "corrections.jsonl", Correction, key=lambda c: c.key)
    log.extend(earlier)
    server.reset(mode)
    start, stopped = time.perf_counter(), None
    try:
        leap.corrections(1, expert_for(server, per), trajectories)
    except ExpertUnavailable as exc:
        stopped = str(exc)
    return log.load(), time.perf_counter() - start, stopped


def visited(trajectories: dict[str, Trajectory]) -> set[str]:
    return {f"1:{t.task.id}:{s.index}" for t in trajectories.values() for s in t.steps}


FAILURES = {
    # mode: (what the dropped reason says, its worst-case seconds per step, whether the round stops after)
    "500": ("InternalServerError", 2 * CLIENT_TIMEOUT_S, True),
    "invalid_json": ("expert failed", 2 * CLIENT_TIMEOUT_S, True),  # a broken reply is a broken endpoint
    "empty": ("AdapterParseError", 2 * CLIENT_TIMEOUT_S, False),
    "slow": ("Timeout", (LITELLM_RETRIES + 1) * CLIENT_TIMEOUT_S * 1.5, True),
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_failing_expert_calls_become_dropped_records(mode: str, env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                    bad_server: BadExpertServer,
                                                    trajectories: dict[str, Trajectory]) -> None:
    steps = visited(trajectories)
    assert 2 <= len(steps) <= 4 and all(s.privileged is not None for t in trajectories.values() for s in t.steps)
    first = next(iter(trajectories.values()))
    earlier = [
        # a record from the previous iteration, and one for a step of this iteration corrected before a crash
        Correction(task_id=first.task.id, step=0, inputs=first.steps[0].inputs, reason="r0", action="look",
                   expert="OracleExpert", iteration=0),
        Correction(task_id=first.task.id, step=0, inputs=first.steps[0].inputs, reason="kept", action="look",
                   expert="PrivilegedExpert", iteration=1),
    ]
    records, elapsed, stopped = correct(env, tiny_model, tmp_path, bad_server, mode, trajectories, earlier)

    assert set(records) == steps | {f"0:{first.task.id}:0"}  # one record per visited step, nothing lost
    assert records[f"0:{first.task.id}:0"].reason == "r0"
    assert records[f"1:{first.task.id}:0"].reason == "kept"  # already corrected: kept, not asked again
    lines = (tmp_path / "iter_1" / "corrections.jsonl").read_text().splitlines()
    assert len(lines) == len(records)  # nothing duplicated
    new = [records[key] for key in steps - {f"1:{first.task.id}:0"}]
    expected_reason, per_call_s, stops = FAILURES[mode]
    # An endpoint that never answered stops the round after every step was asked; an answer that failed does not.
    assert (stopped is not None) == stops and (not stops or f"no answer for {len(steps) - 1} of" in stopped)
    for record in new:
        assert record.dropped is not None and record.dropped.startswith("expert failed:"), record.dropped
        assert expected_reason in record.dropped, record.dropped
        assert record.action == "" and record.reason == ""
        assert record.student_action == next(s.action for s in trajectories[record.task_id].steps
                                             if s.index == record.step)
    # Every new step was asked EXPERT_RETRIES times (each LM call doing its own LiteLLM retries); with four
    # expert threads the steps run side by side. Bound: all steps in one thread, every call at its worst, the
    # backoff sleeps, plus slack for the loaded test machine.
    calls = len(new) * EXPERT_RETRIES
    bound = calls * per_call_s * (LITELLM_RETRIES + 1) + len(new) * 0.5 + 10
    assert elapsed < bound, f"{mode}: {elapsed:.1f}s for {len(new)} steps (bound {bound:.0f}s)"
    assert bad_server.requests >= calls
    print(f"\n{mode}: {len(new)} steps, {bad_server.requests} HTTP requests, {elapsed:.2f}s")


def test_a_flaky_expert_is_retried_into_usable_corrections(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                           bad_server: BadExpertServer,
                                                           trajectories: dict[str, Trajectory]) -> None:
    records, elapsed, _ = correct(env, tiny_model, tmp_path, bad_server, "flaky", trajectories)
    assert set(records) == visited(trajectories)
    for record in records.values():
        assert record.dropped is None, record.dropped
        assert (record.reason, record.action) == ("I look around first.", "look")
    assert bad_server.requests == 2 * len(records)  # one 500 and one answer per step
    assert elapsed < 30


def test_an_inadmissible_action_is_dropped_with_the_action(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                           bad_server: BadExpertServer,
                                                           trajectories: dict[str, Trajectory]) -> None:
    records, _, _ = correct(env, tiny_model, tmp_path, bad_server, "inadmissible", trajectories)
    assert set(records) == visited(trajectories)
    for record in records.values():
        assert record.action == "fly to the moon"
        assert record.dropped == "expert action not admissible: fly to the moon"
    assert bad_server.requests == len(records)  # an answer that parses is not retried


def test_an_empty_action_is_dropped_as_no_action(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                 bad_server: BadExpertServer,
                                                 trajectories: dict[str, Trajectory]) -> None:
    records, _, _ = correct(env, tiny_model, tmp_path, bad_server, "empty_action", trajectories)
    assert set(records) == visited(trajectories)
    for record in records.values():
        assert record.dropped is not None and record.action == ""
    assert {r.dropped for r in records.values()} == {"expert gave no action"}


def test_an_unparsable_answer_costs_one_call_per_attempt(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                        bad_server: BadExpertServer,
                                                        trajectories: dict[str, Trajectory]) -> None:
    """The expert owns its adapter (ChatAdapter without the JSON fallback) in the correction threads, so an
    unparsable answer costs one HTTP call per attempt, not a second JSONAdapter call."""
    records, _, _ = correct(env, tiny_model, tmp_path, bad_server, "empty", trajectories)
    assert bad_server.requests == len(records) * EXPERT_RETRIES


def test_an_expert_over_http_is_billed_once_and_answers_a_rerun_from_the_cache(
        env: ALFWorld, tiny_model: str, tmp_path: Path, trajectories: dict[str, Trajectory]) -> None:
    """A LiteLLM-routed expert served by `leap-dspy serve` over real HTTP: every correction records its calls
    and tokens, and the same corrections asked again (a rerun) cost no HTTP call and no token."""
    server, url = make_server(tiny_model, max_new_tokens=24)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    previous = dspy.cache
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=False, disk_cache_dir=str(tmp_path / "cache"))
    try:
        def run(name: str) -> list[Correction]:
            expert = PrivilegedExpert(f"openai/{server.served_name}", api_base=url + "/v1", api_key="x",
                                      engine="litellm", cache=True, max_tokens=24, num_retries=0)
            leap = LEAP(env, model=tiny_model, run_dir=tmp_path / name, expert_retries=1, expert_threads=2,
                        progress=False)
            log = JsonlLog(tmp_path / name / "iter_1" / "corrections.jsonl", Correction, key=lambda c: c.key)
            leap.corrections(1, expert, trajectories)
            return sorted(log.load().values(), key=lambda c: c.key)

        first = run("first")
        asked = server.counts["chat.completions"]
        bill = expert_usage_metrics(first)
        assert asked == len(first) == bill["expert_calls"] == len(visited(trajectories))
        assert bill["expert_cached_calls"] == 0 and bill["expert_prompt_tokens"] > 100
        assert bill["expert_cost_usd"] is None  # a local model has no price

        second = run("second")
        assert server.counts["chat.completions"] == asked  # zero new expert calls
        rebill = expert_usage_metrics(second)
        assert rebill["expert_calls"] == rebill["expert_cached_calls"] == len(second)
        assert rebill["expert_tokens"] == 0
        assert [(c.key, c.reason, c.action, c.dropped) for c in second] == \
            [(c.key, c.reason, c.action, c.dropped) for c in first]
    finally:
        dspy.cache = previous
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_known_models_are_priced_and_unknown_ones_are_not() -> None:
    assert token_cost_usd("openai/gpt-4o", 1_000_000, 0) > 0
    assert token_cost_usd("openai/gpt-4o", 1000, 100) < token_cost_usd("openai/gpt-4o", 2000, 100)
    assert token_cost_usd("openai/no-such-model-anywhere", 1000, 100) is None
    assert token_cost_usd("local/smollm2-135m", 1000, 100) is None


def test_a_trajectory_expert_answers_every_step_in_one_call(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                           bad_server: BadExpertServer,
                                                           trajectories: dict[str, Trajectory]) -> None:
    """`per="trajectory"`: one call per trajectory returns a typed list of fixes; each step still gets its own
    record, a step the answer skipped is dropped as such, and the call's tokens are booked once."""
    records, _, _ = correct(env, tiny_model, tmp_path, bad_server, "trajectory", trajectories, per="trajectory")
    assert set(records) == visited(trajectories)
    assert bad_server.requests == len(trajectories)
    for record in records.values():
        if record.step == 0:
            assert (record.reason, record.action, record.dropped) == ("I look around first.", "look", None)
            assert record.usage.calls == 1 and record.usage.prompt_tokens == 10
        else:
            assert record.dropped == "expert gave no correction for this step"
            assert record.usage.calls == 0
    assert expert_usage_metrics(list(records.values()))["expert_calls"] == len(trajectories)


def test_a_trajectory_cut_short_by_a_kill_is_asked_whole_again(env: ALFWorld, tiny_model: str, tmp_path: Path,
                                                               bad_server: BadExpertServer,
                                                               trajectories: dict[str, Trajectory]) -> None:
    """A kill between a trajectory's records: the resume asks the same whole-trajectory question (which the
    DSPy cache answers for free), not one about the pending steps only, and keeps the records it had."""
    full, _, _ = correct(env, tiny_model, tmp_path / "full", bad_server, "trajectory", trajectories,
                         per="trajectory")
    asked_uninterrupted = set(bad_server.seen)
    kept = [c for c in full.values() if c.step == 0]  # the first record of each trajectory reached the disk
    assert any(len(t.steps) > 1 for t in trajectories.values())
    resumed, _, _ = correct(env, tiny_model, tmp_path / "resumed", bad_server, "trajectory", trajectories,
                            earlier=kept, per="trajectory")
    assert bad_server.seen == asked_uninterrupted
    assert {k: (c.reason, c.action, c.dropped) for k, c in resumed.items()} == \
        {k: (c.reason, c.action, c.dropped) for k, c in full.items()}


def test_a_retry_asks_the_model_again_not_the_cache_of_its_unparsable_answer(
        env: ALFWorld, tiny_model: str, tmp_path: Path, bad_server: BadExpertServer,
        trajectories: dict[str, Trajectory]) -> None:
    """DSPy caches an answer whether or not it parses: a retry must not read the failed attempt back."""
    previous = dspy.cache
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=False, disk_cache_dir=str(tmp_path / "cache"))
    try:
        leap = LEAP(env, model=tiny_model, run_dir=tmp_path, expert_retries=EXPERT_RETRIES, progress=False)
        expert = PrivilegedExpert("openai/bad-expert", api_base=bad_server.api_base, api_key="x", engine="litellm",
                                  num_retries=0, timeout=CLIENT_TIMEOUT_S, cache=True, max_tokens=64)
        bad_server.reset("unparsable_once")
        records = leap.corrections(1, expert, trajectories)
    finally:
        dspy.cache = previous
    assert records and all(r.dropped is None and r.action == "look" for r in records)
    assert bad_server.requests == 2 * len(records)


def test_failed_corrections_are_asked_again_when_the_round_resumes(
        env: ALFWorld, tiny_model: str, tmp_path: Path, bad_server: BadExpertServer,
        trajectories: dict[str, Trajectory]) -> None:
    """An outage leaves its steps as failed records; the resumed round asks them again, their usage summed."""
    records, _, stopped = correct(env, tiny_model, tmp_path, bad_server, "500", trajectories)
    assert stopped and "round 1: the expert gave no answer" in stopped and "InternalServerError" in stopped
    assert all((r.dropped or "").startswith("expert failed:") for r in records.values())
    records, _, _ = correct(env, tiny_model, tmp_path, bad_server, "ok", trajectories)
    assert set(records) == visited(trajectories)
    assert all(r.dropped is None and r.usage is not None and r.usage.calls == EXPERT_RETRIES + 1
               for r in records.values())
    assert expert_usage_metrics(list(records.values()))["expert_cached_calls"] == 0  # a 500 is no cache hit


def test_an_unreachable_expert_stops_its_episodes_but_an_unparsable_answer_is_recorded(
        env: ALFWorld, tiny_model: str, bad_server: BadExpertServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the expert plays (demonstrations, its reference row) an endpoint that never answers stops the
    compile, the episode unlogged so that a resume plays it; an answer that does not parse is the step's, and
    ends the episode there."""
    from leap_dspy.rollout import ExpertUnavailable, expert_policy, run_parallel

    tasks = env.tasks("train")[:1]
    bad_server.reset("500")
    play = expert_policy(expert_for(bad_server), Student(), env, level=env.default_privilege_level, retries=2)
    with pytest.raises(ExpertUnavailable, match="after 2 attempt.*InternalServerError"):
        run_parallel(play, env, tasks, num_threads=1)
    bad_server.reset("empty")
    [played] = run_parallel(play, env, tasks, num_threads=1)
    # With no action to play, the episode ends at that step, kept with its error; the environment is not stepped.
    assert len(played.steps) == 1 and (played.steps[0].error or "").startswith("expert failed: AdapterParseError")
    assert (played.error or "").startswith("step 0: expert failed: AdapterParseError") and not played.success

    # An API expert with no key is unreachable too: it was logged as lost episodes and a 0.0 expert row.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    keyless = expert_policy(PrivilegedExpert("openai/gpt-4o"), Student(), env, level=env.default_privilege_level,
                            retries=1)
    with pytest.raises(ExpertUnavailable, match="LMNotConfiguredError"):
        run_parallel(keyless, env, tasks, num_threads=1)


def test_the_experts_own_play_is_billed_step_by_step(env: ALFWorld, bad_server: BadExpertServer) -> None:
    """Demonstrations and the reference row are API calls too: each step an LM expert played keeps what its
    attempts cost, and the stage's metrics sum them, a lost episode's included."""
    from leap_dspy.metrics import round_metrics, split_metrics
    from leap_dspy.rollout import expert_policy, run_parallel

    bad_server.reset("empty")  # every attempt answers, unparsably: billed, retried, then the step's error
    play = expert_policy(expert_for(bad_server), Student(), env, level=env.default_privilege_level, retries=2)
    [played] = run_parallel(play, env, env.tasks("train")[:1], num_threads=1)
    assert not played.success and played.steps
    assert all(s.expert_usage is not None and (s.expert_usage.calls, s.expert_usage.prompt_tokens) == (2, 20)
               for s in played.steps)
    bill = split_metrics([played])
    assert (bill["expert_calls"], bill["expert_tokens"]) == (2 * len(played.steps), 30 * len(played.steps))
    assert round_metrics([], {played.task.id: played}, 0, 0.0)["expert_calls"] == bill["expert_calls"]


def test_the_cli_keeps_the_scripted_demonstrator_beside_an_lm_corrector_and_a_rerun_keeps_it(
        tiny_model: str, tmp_path: Path, bad_server: BadExpertServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--demonstrator oracle` with `--expert MODEL`: behaviour cloning from the scripted expert, rounds corrected
    by the LM; `--config` on the run's config.yaml reruns it as it ran (it used to make the LM the demonstrator,
    another configuration)."""
    import sys

    import yaml
    from typer.testing import CliRunner

    from leap_dspy.cli import app

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # `examples` is a folder of the repository
    monkeypatch.setenv("OPENAI_API_BASE", bad_server.api_base)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    sys.path.insert(0, str(root))
    bad_server.reset("ok")
    run = tmp_path / "run"
    tiny = ["--set", "num_boxes=3", "--set", "num_train=3", "--set", "num_seen=1", "--set", "num_unseen=1",
            "--set", "max_steps=8", "--model", tiny_model, "--iterations", "1", "--max-train-rows", "8",
            "--no-expert-reference", "--quiet", "--run-dir", str(run)]
    first = CliRunner().invoke(app, ["compile", "--env", "examples.keybox:KeyBox", "--expert", "openai/bad-expert",
                                     "--demonstrator", "oracle", *tiny])
    assert first.exit_code == 0, first.output
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["demonstrator"]["name"] == "OracleExpert" and recorded["expert"]["name"] == "PrivilegedExpert"
    demos = (run / "iter_0" / "trajectories.jsonl").read_text().splitlines()
    assert demos and all(json.loads(line)["policy"] == "expert" for line in demos)
    corrected = [json.loads(line) for line in (run / "iter_1" / "corrections.jsonl").read_text().splitlines()]
    assert corrected and {c["expert"] for c in corrected} == {"PrivilegedExpert"}  # the LM corrected round 1
    again = CliRunner().invoke(app, ["compile", "--config", str(run / "config.yaml"), *tiny])
    assert again.exit_code == 0, again.output  # the same configuration: resumed, nothing trained again
    assert "fine-tuning" not in again.output
    refused = CliRunner().invoke(app, ["compile", "--env", "examples.keybox:KeyBox", "--expert", "openai/bad-expert",
                                       *tiny])
    assert refused.exit_code == 2 and "demonstrator" in refused.output  # the LM would demonstrate: another run
