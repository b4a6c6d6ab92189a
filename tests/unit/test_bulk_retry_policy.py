"""How a bulk block sends again what it could not confirm: Celery's own publish retry settings."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_msg.bulk_publish import RetryPolicy


def app(**conf: object) -> Celery:
    celery = Celery("bulk-unit", broker="celery-msg://127.0.0.1:1/0", set_as_current=False)
    celery.conf.update(conf)
    return celery


def test_the_apps_publish_retry_policy_is_the_blocks():
    policy = RetryPolicy.of(
        app(task_publish_retry_policy={"max_retries": 7, "interval_start": 1, "interval_step": 2})
    )
    assert policy == RetryPolicy(max_retries=7, interval_start=1, interval_step=2)


def test_celerys_defaults_give_three_retries_waiting_0_then_0_2_then_0_4_seconds():
    policy = RetryPolicy.of(app())
    assert policy.max_retries == 3
    assert [policy.wait(n) for n in range(3)] == pytest.approx([0.0, 0.2, 0.4])


def test_task_publish_retry_off_means_no_resend():
    assert RetryPolicy.of(app(task_publish_retry=False)).max_retries == 0


def test_celerys_producer_or_acquire_yields_a_given_producer_and_releases_nothing():
    # Inside a block, canvas.py hands out the held producer in a nullcontext instead of
    # Celery's FallbackContext: the same only while Celery's yields a given producer as it is
    # and leaves it alone on exit (pinned here against Celery's own code).
    released: list[object] = []

    class Held:
        def release(self) -> None:
            released.append(self)

    held = Held()
    with app().producer_or_acquire(held) as producer:
        assert producer is held
    assert released == []
