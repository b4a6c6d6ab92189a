"""Policy profiles, chosen by name with :attr:`Settings.policies` (``CELERY_MSG_TEST_POLICIES``)
so that the worker process and the test's client app build the same :class:`Policies`."""

from __future__ import annotations

from celery_msg.policy import DeadLetter, Fixed, Policies, Policy, Retry, Unique

from .errors import Fatal

#: Queues whose policy sets one ack mode each (profiles "ack_modes" and "retry").
EARLY_QUEUE, LATE_QUEUE, ON_SUCCESS_QUEUE = "q_early", "q_late", "q_on_success"

_ACK_QUEUES = {
    EARLY_QUEUE: Policy(ack="early"),
    LATE_QUEUE: Policy(ack="late"),
    ON_SUCCESS_QUEUE: Policy(ack="on_success"),
}

PROFILES: dict[str, Policies] = {
    # The same task behaves per the ack mode of the queue it came from.
    "ack_modes": Policies(queues=_ACK_QUEUES),
    # A task that kills its worker is poison after two deliveries.
    "poison": Policies(tasks={"kill_always": Policy(ack="on_success", max_deliveries=2)}),
    "retry": Policies(
        # Applies to every task without a task policy, "autoretry" included (which must keep
        # Celery's own retries only).
        default=Policy(retry=Retry(max_retries=5, backoff=Fixed(0.1))),
        queues=_ACK_QUEUES,
        tasks={
            "attempt": Policy(retry=Retry(max_retries=3, backoff=Fixed(0.5))),
            "always_fail": Policy(retry=Retry(max_retries=2, backoff=Fixed(0.2))),
            "fatal": Policy(retry=Retry(max_retries=3, backoff=Fixed(0.2), give_up_on=(Fatal,))),
        },
    ),
    "expired_dead_lettered": Policies(default=Policy(dead_letter=DeadLetter(expired=True))),
    "expired_counted": Policies(default=Policy(dead_letter=DeadLetter(expired=False))),
    "unique": Policies(tasks={"record_now": Policy(unique=True)}),
    # Acked on receipt, still refused while it runs: unique until it succeeded, or started.
    "unique_until_success": Policies(
        tasks={"sleep_then_record": Policy(ack="early", unique=Unique())}
    ),
    "unique_until_start": Policies(
        tasks={"sleep_then_record": Policy(ack="early", unique=Unique(until="start"))}
    ),
}
