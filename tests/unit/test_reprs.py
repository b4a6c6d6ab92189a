"""celery_msg.reprs.saferepr against Celery's own saferepr: the same text for every argument,
limit and depth (what a task message's argsrepr / kwargsrepr headers carry)."""

from __future__ import annotations

from typing import Any

import celery.app.amqp
from celery.utils.saferepr import saferepr as celerys
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_msg import reprs

scalars = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(),
    st.text(alphabet="ab '\"\\\n\t\x00é"),
    st.binary(max_size=5),
    st.decimals(allow_nan=False),
)
flat = st.one_of(
    st.tuples(scalars),
    st.lists(scalars, max_size=12).map(tuple),
    st.lists(scalars, max_size=12),
    st.dictionaries(st.one_of(st.text(), st.integers()), scalars, max_size=8),
)
nested = st.recursive(flat, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=8)


def same(value: Any, maxlen: int | None, maxlevels: int) -> None:
    try:
        expected: Any = celerys(value, maxlen, maxlevels)
    except ValueError as exc:
        expected = exc.args
    try:
        got: Any = reprs.saferepr(value, maxlen, maxlevels)
    except ValueError as exc:
        got = exc.args
    assert got == expected


@settings(max_examples=1500, deadline=None)
@given(
    value=st.one_of(flat, nested),
    maxlen=st.one_of(st.none(), st.integers(-2, 300)),
    maxlevels=st.integers(-2, 4),
)
def test_every_argument_reads_as_celerys_saferepr_writes_it(value, maxlen, maxlevels):
    same(value, maxlen, maxlevels)


@given(n=st.integers(0, 40), width=st.integers(1, 12))
def test_around_the_limit_the_text_is_cut_exactly_where_celery_cuts_it(n, width):
    value = tuple(10**width - 1 for _ in range(n))
    for maxlen in range(max(0, len(repr(value)) - 3), len(repr(value)) + 3):
        same(value, maxlen, 3)


def test_the_common_arguments_take_the_short_way_and_the_rest_celerys():
    calls: list[Any] = []
    original = reprs.celerys_saferepr
    reprs.celerys_saferepr = lambda *a: calls.append(a) or original(*a)  # type: ignore[assignment]
    try:
        assert reprs.saferepr((1, "a", None, 2.5, True), 1024, 3) == "(1, 'a', None, 2.5, True)"
        assert reprs.saferepr({"x": 1}, 1024, 3) == "{'x': 1}"
        assert calls == []
        assert reprs.saferepr(("it's",), 1024, 3) == celerys(("it's",), 1024, 3)
        assert reprs.saferepr(((1,),), 1024, 3) == "((1,),)"
        assert len(calls) == 2
    finally:
        reprs.celerys_saferepr = original


def test_an_int_too_long_for_str_is_refused_as_celery_refuses_it():
    same((10**5000,), 1024, 3)
    same(((10**5000,),), 100_000, 3)


def test_installed_where_celerys_task_messages_look_it_up():
    reprs.install()
    assert celery.app.amqp.saferepr is reprs.saferepr
    reprs.install()  # once
    assert celery.app.amqp.saferepr is reprs.saferepr


def test_a_benchmark_can_have_celerys_own_back_for_a_while():
    reprs.install()
    with reprs.celerys_own():
        assert celery.app.amqp.saferepr is celerys
    assert celery.app.amqp.saferepr is reprs.saferepr
