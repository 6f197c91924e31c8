"""The run report's view of replicas and nodes, from the progress tracker's attempts (no Ray).

The attempts are written by hand as the tracker records them (`ProgressTracker.snapshot`): a
replica process is (node, actor, pid); Ray restarts an actor as a new process, on whatever node
has room. What each case must come to is stated from the story, not from running the code.
"""

from __future__ import annotations

from pipeline_fixtures import write_shards

from pipeline import PipelineConfig
from pipeline.api import _given_up
from pipeline.plan import make_plan
from pipeline.progress import summarize
from pipeline.report import UnitStats, nodes_lost_report, replica_report

LOST, LIVE = "node-lost", "node-live"


def attempt(unit, node, actor, pid, state, rows_done, t, tokens=0, seconds=1.0):
    return {"unit": unit, "node_id": node, "actor_id": actor, "pid": pid, "state": state, "rows_done": rows_done,
            "tokens": tokens, "started_at": t, "seconds": seconds, "rows": 8}


def spot_loss_attempts() -> list[dict]:
    """Actor A on the node that is lost finishes u1, dies in u2 after 3 rows; Ray restarts A on
    the live node, where it redoes u2. Actor B on the live node does u3. Actor C finishes u4 on
    the lost node and is idle when the node goes; Ray restarts it on the live node and it does u5."""
    return [
        attempt("u1", LOST, "A", 10, "done", 8, 1.0, tokens=64),
        attempt("u2", LOST, "A", 10, "lost", 3, 2.0, tokens=24),
        attempt("u2", LIVE, "A", 20, "done", 8, 5.0, tokens=64),
        attempt("u3", LIVE, "B", 11, "done", 8, 1.5, tokens=64),
        attempt("u4", LOST, "C", 12, "done", 8, 1.2, tokens=64),
        attempt("u5", LIVE, "C", 30, "done", 8, 6.0, tokens=64),
    ]


def by_process(replicas) -> dict:
    return {(r["node_id"], r["actor_id"], r["pid"]): r for r in replicas}


def test_replicas_on_a_lost_node_end_node_lost_and_the_unit_is_counted_retried_for_it():
    attempts = spot_loss_attempts()
    reps = by_process(replica_report(attempts, [], {LOST}))
    assert set(reps) == {(LOST, "A", 10), (LIVE, "A", 20), (LIVE, "B", 11), (LOST, "C", 12), (LIVE, "C", 30)}
    a = reps[(LOST, "A", 10)]
    assert (a["ended"], a["units"], a["rows"], a["tokens"]) == ("node_lost", 1, 8, 64)
    assert (a["units_interrupted"], a["rows_interrupted"], a["seconds"]) == (1, 3, 2.0)
    assert reps[(LOST, "C", 12)]["ended"] == "node_lost"  # idle when its node went: its actor moved on
    assert reps[(LOST, "C", 12)]["units_interrupted"] == 0
    assert [reps[k]["ended"] for k in [(LIVE, "A", 20), (LIVE, "B", 11), (LIVE, "C", 30)]] == ["finished"] * 3
    assert sum(r["units"] for r in reps.values()) == 5  # every unit committed once

    retries = summarize(attempts, {f"u{i}": 8 for i in range(1, 6)}, {LOST})
    assert retries["rows_retried"] == 8 and list(retries["retried"]) == ["u2"]
    u2 = retries["retried"]["u2"]
    assert u2["attempts"] == 2 and u2["node_lost"] == 1
    assert u2["why"] == ["node lost: its node died after 3 rows (actor A pid 10 on node node-lost)"]
    assert nodes_lost_report(attempts, retries["retried"], {LOST}) == {"nodes": [LOST], "units_retried": 1,
                                                                       "rows_retried": 8}


def test_the_same_deaths_on_a_live_node_are_replica_deaths():
    attempts = spot_loss_attempts()
    reps = by_process(replica_report(attempts, [], set()))
    assert reps[(LOST, "A", 10)]["ended"] == "died" and reps[(LOST, "C", 12)]["ended"] == "died"
    retries = summarize(attempts, {"u2": 8}, set())
    assert retries["retried"]["u2"]["node_lost"] == 0
    assert retries["retried"]["u2"]["why"][0].startswith("replica died after 3 rows")
    assert nodes_lost_report(attempts, retries["retried"], set()) == {"nodes": [], "units_retried": 0, "rows_retried": 0}


def test_a_node_scaled_down_after_its_replica_finished_is_no_loss():
    """The autoscaler takes an idle node back after the run: its replica finished."""
    attempts = [attempt("u1", LOST, "A", 10, "done", 8, 1.0), attempt("u2", LIVE, "B", 11, "done", 8, 1.0)]
    assert [r["ended"] for r in replica_report(attempts, [], {LOST})] == ["finished", "finished"]


def test_a_stuck_replica_killed_by_the_watchdog_died():
    attempts = [attempt("u1", LIVE, "A", 10, "stuck", 2, 1.0), attempt("u1", LIVE, "A", 20, "done", 8, 9.0)]
    reps = by_process(replica_report(attempts, [], set()))
    assert reps[(LIVE, "A", 10)]["ended"] == "died" and reps[(LIVE, "A", 10)]["stuck"]
    assert reps[(LIVE, "A", 20)]["ended"] == "finished" and not reps[(LIVE, "A", 20)]["stuck"]


def test_without_the_tracker_replicas_come_from_the_units_and_say_nothing_of_how_they_ended():
    ran = [UnitStats(status="done", node_id=LIVE, actor_id="A", pid=10, rows_out=8, tokens_generated=64, seconds=1.5),
           UnitStats(status="done", node_id=LIVE, actor_id="A", pid=10, rows_out=4, tokens_generated=32, seconds=0.5)]
    [r] = replica_report(None, ran, set())
    assert (r["units"], r["rows"], r["tokens"], r["seconds"], r["ended"]) == (2, 12, 96, 2.0, None)


def test_units_without_a_result_are_run_again_unless_they_used_up_their_attempts(tmp_path):
    """Ray gave up on three units' tasks: one never started (its actor was unreachable), one was
    cut short once (its node lost), one killed its replica on every attempt (max_unit_retries=1:
    two attempts). The first two are run again; the last stays failed."""
    write_shards(str(tmp_path / "in"), shards=4, rows=2)
    config = PipelineConfig(task="generate", input=str(tmp_path / "in"), output=str(tmp_path / "out"), model="m",
                            max_unit_retries=1).validate()
    plan = make_plan(config)
    names = [u.output_name for u in plan.todo]
    results = {names[0]: {"status": "done"}}
    attempts = [attempt(names[0], LIVE, "A", 1, "done", 2, 1.0),
                attempt(names[2], LOST, "B", 2, "running", 1, 1.0),
                attempt(names[3], LIVE, "A", 3, "lost", 0, 2.0), attempt(names[3], LIVE, "A", 4, "lost", 0, 3.0)]
    again = _given_up(config, plan, results, "run-1", attempts)
    assert [u.output_name for u in again] == [names[1], names[2]]
    assert _given_up(config, plan, results, "run-1", None) == []  # attempts unknown: report them failed
