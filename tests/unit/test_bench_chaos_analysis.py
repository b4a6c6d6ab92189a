"""The chaos benchmark counts effects: what its analysis makes of recorded starts and finishes."""

from __future__ import annotations

from bench.chaos import Events, Fault, Kill, analyse, attribute

A, B, C = 100, 200, 300  # process groups: worker incarnations


def record(*lines: str) -> Events:
    """Events from task lines as the task writes them: ``S|F index pgid pid time``."""
    return Events.parse([line.encode() for line in lines])


def test_a_task_that_never_finished_is_lost_and_one_finished_twice_is_a_duplicate() -> None:
    events = record(
        "S 0 100 1 1.0",
        "F 0 100 1 1.1",
        "S 1 100 1 1.2",  # killed while running, never run again: lost
        "S 2 100 1 1.3",
        "F 2 100 1 1.4",  # finished, then run again after the kill
        "S 2 200 2 7.0",
        "F 2 200 2 7.1",
    )
    out = analyse(events, 3, [Kill(at=1.5, role="solo", pgid=A)])
    assert (out["lost"], out["dup_completions"], out["dup_starts"]) == (1, 1, 1)
    assert out["dup_per_kill"] == 1.0


def test_recovery_is_the_first_restart_of_a_task_the_killed_incarnation_held() -> None:
    events = record(
        "S 0 100 1 1.0",  # running at the kill (pgid A)
        "S 1 100 1 0.5",
        "F 1 100 1 0.6",  # finished before the kill and never again: not held
        "S 0 200 2 6.5",  # A's task again, 5.5 s after the kill
        "F 0 200 2 6.6",
        "S 2 300 3 2.0",  # started by another worker after the kill: not A's
        "F 2 300 3 2.1",
    )
    out = analyse(events, 3, [Kill(at=1.0, role="solo", pgid=A)])
    assert out["recovery_s"] == 5.5
    assert (out["kills_holding_tasks"], out["kills_never_recovered"]) == (1, 0)


def test_a_kill_whose_running_task_never_starts_again_counts_as_never_recovered() -> None:
    events = record("S 0 100 1 1.0", "S 1 200 2 1.0", "F 1 200 2 1.1")
    out = analyse(events, 2, [Kill(at=1.5, role="solo", pgid=A), Kill(2.0, "solo", C)])
    assert out["recovery_s"] is None
    assert (out["kills_holding_tasks"], out["kills_never_recovered"]) == (1, 1)
    assert out["lost"] == 1


def test_each_duplicate_is_attributed_to_the_fault_between_its_two_runs() -> None:
    events = record(
        # 0: finished on A, A killed before its ack landed, run again on C: a kill.
        "S 0 100 1 1.0",
        "F 0 100 1 1.1",
        "S 0 300 3 7.0",
        "F 0 300 3 7.1",
        # 1: finished on B (the partitioned solo worker), run again on C after the partition.
        "S 1 200 2 10.0",
        "F 1 200 2 10.1",
        "S 1 300 3 16.0",
        "F 1 300 3 16.1",
        # 2: finished on C, run again on C after a Redis restart (its ack did not land).
        "S 2 300 3 20.0",
        "F 2 300 3 20.1",
        "S 2 300 3 25.2",
        "F 2 300 3 25.3",
        # 3: started twice on C at once, a retried publish: two messages of one task.
        "S 3 300 3 40.0",
        "F 3 300 3 40.1",
        "S 3 300 4 40.0",
        "F 3 300 4 40.1",
        # 4: killed while running on C, run again on another worker: a start, no completion.
        "S 4 300 3 50.0",
        "S 4 400 5 56.0",
        "F 4 400 5 56.1",
    )
    faults = [
        Fault(1.5, "kill", "prefork", A),
        Fault(10.5, "partition", "solo"),
        Fault(16.5, "heal", "solo"),
        Fault(20.2, "redis_restart"),
        Fault(50.5, "kill", "prefork", C),
    ]
    roles = {A: "prefork", B: "solo", C: "prefork", 400: "prefork"}
    out = attribute(events, faults, roles, republished=frozenset({3}))
    completions = {k: v for k, v in out["dup_completions_by_cause"].items() if v}
    starts = {k: v for k, v in out["dup_starts_by_cause"].items() if v}
    assert completions == {"kill": 1, "partition": 1, "redis_restart": 1, "publish_retry": 1}
    assert starts == {"kill": 2, "partition": 1, "redis_restart": 1, "publish_retry": 1}
