"""celery_msg.policy: validation at construction, layering in resolve(), backoff schedules."""

from __future__ import annotations

import math
import random
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celery_msg.errors import ConfigurationError
from celery_msg.policy import (
    BUILTIN,
    DeadLetter,
    Exponential,
    Fixed,
    Policies,
    Policy,
    Resolved,
    Retry,
    Unique,
    policies_from,
)

# -- validation: every bad field fails at construction, naming Class.field -----------------

BAD_FIELDS: list[tuple[type, dict[str, Any], str]] = [
    (Fixed, {"seconds": -1}, "Fixed.seconds"),
    (Fixed, {"seconds": "10"}, "Fixed.seconds"),
    (Fixed, {"seconds": True}, "Fixed.seconds"),
    (Fixed, {"seconds": None}, "Fixed.seconds"),
    (Exponential, {"base": 0}, "Exponential.base"),
    (Exponential, {"base": -1.5}, "Exponential.base"),
    (Exponential, {"base": "1"}, "Exponential.base"),
    (Exponential, {"factor": 0.5}, "Exponential.factor"),
    (Exponential, {"factor": "2"}, "Exponential.factor"),
    (Exponential, {"factor": False}, "Exponential.factor"),
    (Exponential, {"cap": -0.1}, "Exponential.cap"),
    (Exponential, {"cap": None}, "Exponential.cap"),
    (Exponential, {"jitter": "half"}, "Exponential.jitter"),
    (Exponential, {"jitter": True}, "Exponential.jitter"),
    (Retry, {"max_retries": -1}, "Retry.max_retries"),
    (Retry, {"max_retries": 1.5}, "Retry.max_retries"),
    (Retry, {"max_retries": True}, "Retry.max_retries"),
    (Retry, {"max_retries": None}, "Retry.max_retries"),
    (Retry, {"backoff": 5}, "Retry.backoff"),
    (Retry, {"backoff": "fixed"}, "Retry.backoff"),
    (Retry, {"retry_on": (ValueError, int)}, "Retry.retry_on"),
    (Retry, {"retry_on": [ValueError]}, "Retry.retry_on"),
    (Retry, {"retry_on": ValueError("x")}, "Retry.retry_on"),
    (Retry, {"give_up_on": ("KeyError",)}, "Retry.give_up_on"),
    (Retry, {"give_up_on": str}, "Retry.give_up_on"),
    (DeadLetter, {"enabled": 1}, "DeadLetter.enabled"),
    (DeadLetter, {"enabled": None}, "DeadLetter.enabled"),
    (DeadLetter, {"expired": "yes"}, "DeadLetter.expired"),
    (DeadLetter, {"max_length": 0}, "DeadLetter.max_length"),
    (DeadLetter, {"max_length": 10.0}, "DeadLetter.max_length"),
    (DeadLetter, {"max_length": True}, "DeadLetter.max_length"),
    (DeadLetter, {"max_age": 0}, "DeadLetter.max_age"),
    (DeadLetter, {"max_age": -5}, "DeadLetter.max_age"),
    (DeadLetter, {"max_age": "7d"}, "DeadLetter.max_age"),
    (Policy, {"ack": "sometimes"}, "Policy.ack"),
    (Policy, {"ack": "LATE"}, "Policy.ack"),
    (Policy, {"max_deliveries": -1}, "Policy.max_deliveries"),
    (Policy, {"max_deliveries": 2.0}, "Policy.max_deliveries"),
    (Policy, {"max_deliveries": True}, "Policy.max_deliveries"),
    (Policy, {"retry": Fixed()}, "Policy.retry"),
    (Policy, {"retry": {"max_retries": 3}}, "Policy.retry"),
    (Policy, {"dead_letter": True}, "Policy.dead_letter"),
    (Policy, {"dead_letter": Retry()}, "Policy.dead_letter"),
    (Policy, {"unique": "yes"}, "Policy.unique"),
    (Policy, {"unique": 1}, "Policy.unique"),
    (Unique, {"until": "finish"}, "Unique.until"),
    (Unique, {"ttl": 0}, "Unique.ttl"),
    (Unique, {"ttl": "1h"}, "Unique.ttl"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    BAD_FIELDS,
    ids=[f"{field}={next(iter(kw.values()))!r}" for _, kw, field in BAD_FIELDS],
)
def test_a_bad_field_raises_a_configuration_error_naming_class_and_field(
    cls: type, kwargs: dict[str, Any], field: str
):
    with pytest.raises(ConfigurationError) as caught:
        cls(**kwargs)
    message = str(caught.value)
    assert message.startswith(f"{field}: "), message
    # The offending value is shown (for the non-bool fields that say "got ...").
    if "got" in message:
        assert repr(next(iter(kwargs.values()))) in message


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (Fixed, {"seconds": math.nan}, "Fixed.seconds"),
        (Exponential, {"cap": math.nan}, "Exponential.cap"),
        (Exponential, {"factor": math.nan}, "Exponential.factor"),
    ],
    ids=["Fixed.seconds", "Exponential.cap", "Exponential.factor"],
)
def test_nan_is_not_a_number_of_seconds(cls: type, kwargs: dict[str, Any], field: str):
    # "must be a number >= 0": NaN is not >= 0, and a NaN delay would schedule nothing sane.
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(field)}: "):
        cls(**kwargs)


def test_valid_edge_values_are_accepted():
    assert Fixed(0).seconds == 0
    assert Exponential(base=0.001, factor=1, cap=0, jitter=None).cap == 0
    assert Retry(max_retries=0).max_retries == 0
    assert DeadLetter(enabled=False, max_length=None, max_age=None, expired=False).enabled is False
    assert DeadLetter(max_length=1, max_age=0.5).max_length == 1
    for ack in ("early", "late", "on_success", None):
        assert Policy(ack=ack).ack == ack
    assert Policy(max_deliveries=0, unique=False).max_deliveries == 0


def test_a_single_exception_type_is_taken_as_a_one_element_tuple():
    retry = Retry(retry_on=OSError, give_up_on=FileNotFoundError)
    assert retry.retry_on == (OSError,)
    assert retry.give_up_on == (FileNotFoundError,)


def test_policies_validates_its_layers_naming_where():
    with pytest.raises(ConfigurationError, match=r"^policies\.default: must be a Policy"):
        Policies(default=Retry())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^policies\.queues\['q'\]: must be a Policy"):
        Policies(queues={"ok": Policy(), "q": Retry()})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match=r"^policies\.tasks\[1\]: must be a Policy"):
        Policies(tasks={1: Policy()})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match=r"^policies\.tasks: must be a mapping"):
        Policies(tasks=[("x", Policy())])  # type: ignore[arg-type]


def test_policies_from_accepts_none_or_policies_only():
    assert policies_from(None) == Policies()
    mine = Policies(default=Policy(ack="late"))
    assert policies_from(mine) is mine
    with pytest.raises(ConfigurationError, match=r"^msg_policies: must be a celery_msg\.Policies"):
        policies_from({"default": Policy()})


def test_an_error_in_a_nested_policy_is_raised_where_it_is_built():
    # Objects are checked when built: the innermost class and field are named.
    with pytest.raises(ConfigurationError, match=r"^Exponential\.base: "):
        Policies(tasks={"t": Policy(retry=Retry(backoff=Exponential(base=0)))})


# -- precedence: task > queue > default > built-in; exact name > glob -----------------------


def test_no_policy_at_all_resolves_to_the_built_in_defaults():
    resolved = Policies().resolve("any.task", "celery")
    assert resolved == Resolved(
        ack=None, max_deliveries=0, retry=None, dead_letter=DeadLetter(), unique=None
    )
    assert Policies().resolve(None, None) == resolved
    assert BUILTIN.dead_letter == DeadLetter()


def test_each_layer_overrides_only_the_fields_it_sets():
    default_dl = DeadLetter(max_length=100)
    queue_retry = Retry(max_retries=5, backoff=Fixed(1))
    task_retry = Retry(max_retries=1, backoff=Fixed(30))
    policies = Policies(
        default=Policy(ack="late", dead_letter=default_dl, max_deliveries=3),
        queues={"slow": Policy(retry=queue_retry, max_deliveries=7)},
        tasks={"reports.daily": Policy(retry=task_retry, unique=True)},
    )

    # default over built-in
    assert policies.resolve("other", "fast") == Resolved(
        ack="late", max_deliveries=3, retry=None, dead_letter=default_dl, unique=None
    )
    # queue over default
    assert policies.resolve("other", "slow") == Resolved(
        ack="late", max_deliveries=7, retry=queue_retry, dead_letter=default_dl, unique=None
    )
    # task over queue over default: the task's retry, the queue's max_deliveries, the default's
    # ack and dead-letter retention
    assert policies.resolve("reports.daily", "slow") == Resolved(
        ack="late", max_deliveries=7, retry=task_retry, dead_letter=default_dl, unique=Unique()
    )
    # a task policy applies whatever the queue
    assert policies.resolve("reports.daily", "fast").retry == task_retry
    assert policies.resolve("reports.daily", None).max_deliveries == 3


def test_a_task_layer_wins_over_the_queue_layer_field_by_field():
    policies = Policies(
        default=Policy(ack="early", unique=False),
        queues={"q": Policy(ack="on_success", unique=True, dead_letter=DeadLetter(max_age=60))},
        tasks={"t": Policy(ack="late")},
    )
    resolved = policies.resolve("t", "q")
    assert resolved.ack == "late"
    assert resolved.unique == Unique(until="success")
    assert resolved.dead_letter == DeadLetter(max_age=60)
    assert policies.resolve("u", "q").ack == "on_success"
    assert policies.resolve("u", "other").ack == "early"


def test_an_exact_task_name_wins_over_a_matching_glob_whatever_the_order():
    glob, exact = Policy(max_deliveries=1), Policy(max_deliveries=2)
    for tasks in (
        {"reports.*": glob, "reports.daily": exact},
        {"reports.daily": exact, "reports.*": glob},
    ):
        policies = Policies(tasks=tasks)
        assert policies.resolve("reports.daily", None).max_deliveries == 2
        assert policies.resolve("reports.weekly", None).max_deliveries == 1
        assert policies.resolve("reports", None).max_deliveries == 0
        assert policies.resolve("billing.daily", None).max_deliveries == 0


def test_glob_patterns_use_fnmatch_syntax_case_sensitively():
    policies = Policies(
        tasks={
            "a.?": Policy(max_deliveries=1),
            "b.[xy]": Policy(max_deliveries=2),
            "C.*": Policy(max_deliveries=3),
        }
    )
    assert policies.resolve("a.1", None).max_deliveries == 1
    assert policies.resolve("a.12", None).max_deliveries == 0
    assert policies.resolve("b.y", None).max_deliveries == 2
    assert policies.resolve("b.z", None).max_deliveries == 0
    assert policies.resolve("c.task", None).max_deliveries == 0
    assert policies.resolve("C.task", None).max_deliveries == 3


def test_a_name_without_glob_characters_matches_only_itself():
    policies = Policies(tasks={"reports": Policy(max_deliveries=4)})
    assert policies.resolve("reports", None).max_deliveries == 4
    assert policies.resolve("reports.daily", None).max_deliveries == 0


def test_a_task_layer_applies_to_its_task_only_not_to_tasks_of_its_queue():
    policies = Policies(tasks={"q": Policy(max_deliveries=9)})
    # "q" is a task name here, not a queue name.
    assert policies.resolve("x", "q").max_deliveries == 0
    assert policies.resolve("q", "x").max_deliveries == 9


def test_changing_the_mapping_given_to_policies_later_changes_nothing():
    tasks = {"t": Policy(max_deliveries=1)}
    policies = Policies(tasks=tasks)
    assert policies.resolve("t", None).max_deliveries == 1
    tasks["t"] = Policy(max_deliveries=2)
    tasks["u"] = Policy(max_deliveries=3)
    assert policies.resolve("t", None).max_deliveries == 1
    assert policies.resolve("u", None).max_deliveries == 0


def test_two_equal_policies_objects_resolve_independently():
    a = Policies(default=Policy(max_deliveries=1))
    b = Policies(default=Policy(max_deliveries=2))
    assert a.resolve("t", "q").max_deliveries == 1
    assert b.resolve("t", "q").max_deliveries == 2
    assert a.resolve("t", "q").max_deliveries == 1


def test_over_keeps_the_lower_layer_where_the_upper_is_unset():
    lower = Policy(ack="late", max_deliveries=3, unique=True)
    upper = Policy(max_deliveries=0, unique=False)
    # 0 and False are values, not "unset".
    assert upper.over(lower) == Policy(ack="late", max_deliveries=0, unique=False)


# -- backoff -----------------------------------------------------------------------------

retries = st.integers(min_value=0, max_value=5_000)
bases = st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)
factors = st.floats(min_value=1.0, max_value=100.0, allow_nan=False, allow_infinity=False)
caps = st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False)
seeds = st.integers(min_value=0, max_value=2**32)


@given(base=bases, factor=factors, cap=caps, r=retries, step=st.integers(1, 2_000))
def test_exponential_ceiling_never_decreases_and_never_exceeds_the_cap(
    base: float, factor: float, cap: float, r: int, step: int
):
    policy = Exponential(base=base, factor=factor, cap=cap, jitter=None)
    now, later = policy.ceiling(r), policy.ceiling(r + step)
    assert 0 <= now <= later <= cap
    assert policy.ceiling(r + 1) >= now
    # Without jitter, the delay is the ceiling.
    assert policy.delay(r, random.Random(0)) == now


@given(base=bases, factor=factors, cap=caps, r=st.integers(0, 60))
def test_exponential_ceiling_is_base_times_factor_to_the_retries_below_the_cap(
    base: float, factor: float, cap: float, r: int
):
    expected = min(cap, base * factor**r)
    assert Exponential(base=base, factor=factor, cap=cap).ceiling(r) == pytest.approx(expected)


def test_exponential_examples():
    policy = Exponential(base=1, factor=2, cap=600, jitter=None)
    assert [policy.ceiling(r) for r in range(12)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600
    ]  # fmt: skip
    assert policy.ceiling(10_000) == 600
    assert policy.ceiling(10**9) == 600
    assert Exponential(base=5, factor=1, cap=600).ceiling(10**6) == 5
    assert Exponential(base=10, factor=3, cap=1).ceiling(0) == 1


def test_an_infinite_cap_is_rejected_or_never_overflows():
    # The code guards factor ** retries against overflow by comparing logarithms first; an
    # infinite cap ("no cap") passes validation and must not make ceiling() raise.
    try:
        policy = Exponential(base=1, factor=2, cap=math.inf, jitter=None)
    except ConfigurationError:
        return
    assert policy.ceiling(2_000) >= policy.ceiling(1_000) > 0


@given(base=bases, factor=factors, cap=caps, r=retries, seed=seeds)
def test_full_jitter_draws_between_zero_and_the_ceiling(
    base: float, factor: float, cap: float, r: int, seed: int
):
    policy = Exponential(base=base, factor=factor, cap=cap, jitter="full")
    delay = policy.delay(r, random.Random(seed))
    assert 0.0 <= delay <= policy.ceiling(r)


@given(base=bases, factor=factors, cap=caps, r=retries, seed=seeds)
def test_equal_jitter_draws_between_half_the_ceiling_and_the_ceiling(
    base: float, factor: float, cap: float, r: int, seed: int
):
    policy = Exponential(base=base, factor=factor, cap=cap, jitter="equal")
    ceiling = policy.ceiling(r)
    delay = policy.delay(r, random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling


def test_jitter_actually_spreads_the_delays():
    rng = random.Random(42)
    full = {Exponential(base=8, cap=100, jitter="full").delay(3, rng) for _ in range(50)}
    equal = {Exponential(base=8, cap=100, jitter="equal").delay(3, rng) for _ in range(50)}
    assert len(full) == 50 and min(full) < 32 and max(full) > 32
    assert len(equal) == 50 and min(equal) >= 32


@given(seconds=st.floats(0, 1e6, allow_nan=False), r=retries, seed=seeds)
def test_fixed_is_the_same_delay_for_every_retry(seconds: float, r: int, seed: int):
    policy = Fixed(seconds)
    assert policy.delay(r, random.Random(seed)) == float(seconds)
    assert Retry(backoff=policy).countdown(r) == float(seconds)
    assert isinstance(Retry(backoff=Fixed(3)).countdown(r), float)


@given(r=st.integers(0, 1000))
def test_a_callable_backoff_is_called_with_the_retries_so_far(r: int):
    calls: list[int] = []

    def backoff(n: int) -> float:
        calls.append(n)
        return n * 1.5

    retry = Retry(backoff=backoff)
    assert retry.countdown(r) == r * 1.5
    assert calls == [r]
    assert isinstance(Retry(backoff=lambda n: 7).countdown(r), float)


@pytest.mark.parametrize("bad", [-1, -0.001, "5", None, True, [1]])
def test_a_callable_backoff_returning_a_bad_value_raises(bad: Any):
    retry = Retry(backoff=lambda n: bad)
    with pytest.raises(ConfigurationError, match=r"backoff callable returned .* for 4 retries"):
        retry.countdown(4)


def test_a_callable_backoff_returning_nan_raises():
    retry = Retry(backoff=lambda n: math.nan)
    with pytest.raises(ConfigurationError, match=r"backoff callable returned nan"):
        retry.countdown(1)


def test_retry_countdown_with_exponential_uses_the_given_rng():
    retry = Retry(backoff=Exponential(base=2, factor=2, cap=1000, jitter="full"))
    assert retry.countdown(5, random.Random(7)) == retry.countdown(5, random.Random(7))
    assert 0 <= retry.countdown(5) <= 64
    assert Retry().backoff == Exponential()


# -- Retry.applies_to ---------------------------------------------------------------------


class Transient(OSError):
    pass


class Permanent(Transient):
    pass


def test_by_default_every_exception_is_retried_but_not_base_exceptions():
    retry = Retry()
    assert retry.applies_to(ValueError("x"))
    assert retry.applies_to(Transient())
    assert not retry.applies_to(KeyboardInterrupt())
    assert not retry.applies_to(SystemExit(1))


def test_retry_on_limits_retries_to_those_types_and_their_subclasses():
    retry = Retry(retry_on=(OSError, LookupError))
    assert retry.applies_to(OSError())
    assert retry.applies_to(Transient())
    assert retry.applies_to(KeyError("k"))
    assert not retry.applies_to(ValueError())


def test_give_up_on_wins_over_retry_on():
    retry = Retry(retry_on=(OSError,), give_up_on=(Permanent,))
    assert retry.applies_to(Transient())
    assert not retry.applies_to(Permanent())
    # give_up_on alone narrows the default Exception
    retry = Retry(give_up_on=ValueError)
    assert not retry.applies_to(ValueError())
    assert not retry.applies_to(UnicodeDecodeError("utf-8", b"", 0, 1, "x"))
    assert retry.applies_to(TypeError())


def test_an_empty_retry_on_retries_nothing():
    assert not Retry(retry_on=()).applies_to(Exception())
