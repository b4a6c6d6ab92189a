"""The Lua sources: generated preamble, expanded includes, documented headers, Cluster-safe keys."""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from importlib.resources.abc import Traversable

import pytest
import redis

from celery_msg.keys import PUBLISH_KEY_PARTS, QUEUE_KEY_PARTS, Counter
from celery_msg.scripts import SCRIPT_NAMES, Code, source, where
from celery_msg.transitions import Scripts


def _lua_dir() -> Traversable:
    return resources.files("celery_msg").joinpath("lua")


def _raw(name: str) -> str:
    return _lua_dir().joinpath(name).read_text(encoding="utf-8")


def _code_lines(text: str) -> str:
    """The text without Lua comments, so that prose never triggers a grep."""
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("--") or line.startswith("--@include"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_every_script_file_is_a_known_script_and_every_known_script_has_a_file():
    files = {entry.name for entry in _lua_dir().iterdir() if entry.name.endswith(".lua")}
    scripts = {f"{name}.lua" for name in SCRIPT_NAMES}

    assert scripts <= files
    assert {name for name in files - scripts if not name.startswith("_")} == set()


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_declares_the_return_codes_of_the_code_enum(name: str):
    declared = dict(re.findall(r"^local ([A-Z_]+) = (-?\d+)$", source(name), re.MULTILINE))

    for code in Code:
        assert declared.get(code.name) == str(code.value), f"{name}: {code.name}"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_gets_the_key_layout_from_python(name: str):
    text = source(name)

    assert f"local NK = {len(QUEUE_KEY_PARTS)}\n" in text
    parts = re.search(r"^local PARTS = \{(.*)\}$", text, re.MULTILINE)
    assert parts is not None
    assert re.findall(r"'([a-z_]+)'", parts.group(1)) == list(QUEUE_KEY_PARTS)
    # publish.lua takes only the parts it touches (tests/lua/test_publish.py runs every branch
    # of it with just those keys: a missing one would be nil and fail the call).
    publish = re.search(r"^local PUBLISH_PARTS = \{(.*)\}$", text, re.MULTILINE)
    assert publish is not None
    assert re.findall(r"'([a-z_]+)'", publish.group(1)) == list(PUBLISH_KEY_PARTS)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_includes_are_expanded_in_the_source_sent_to_redis(name: str):
    text = source(name)

    assert "--@include" not in text
    assert "--@include _queue.lua" in _raw(f"{name}.lua")
    assert text.count("local function queue_keys(group)") == 1
    assert _raw("_queue.lua") in text


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_file_opens_with_a_header_naming_keys_argv_and_returns(name: str):
    raw = _raw(f"{name}.lua")
    header = _header(raw)

    assert raw.startswith(f"-- {name}:"), "the header starts with the script's name"
    assert "KEYS" in header
    assert "ARGV" in header
    assert "Returns" in header


def test_the_shared_helper_file_opens_with_a_header_comment():
    assert _header(_raw("_queue.lua")).startswith("-- Shared helpers")


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_no_script_indexes_keys_with_an_argv_value(name: str):
    code = _code_lines(source(name))

    assert not re.search(r"KEYS\s*\[[^\]]*ARGV", code)
    # KEYS is only indexed by the shared helpers: from the group offset and the part position,
    # and the one key after a group's parts (publish's bindings version).
    indexes = re.findall(r"KEYS\s*\[([^\]]*)\]", code)
    assert sorted(indexes) == ["#parts + 1", "offset + i"]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_queue_key_a_script_names_is_a_part_of_the_layout(name: str):
    # A part that is not in QUEUE_KEY_PARTS (say a stale q.prio) is nil in Lua: the script
    # would fail only when it reaches that line, so every name is checked here.
    code = _code_lines(source(name))

    used = set(re.findall(r"\b(?:q|queues\[g\])\.([A-Za-z_]+)", code))
    assert used, "the grep must find the script's keys"
    assert used <= set(QUEUE_KEY_PARTS)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_no_script_scans_or_lists_the_keyspace(name: str):
    code = _code_lines(source(name))

    calls = re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", code)
    assert calls, "the grep must find the script's commands"
    assert not {c.upper() for c in calls} & {"KEYS", "SCAN", "HSCAN", "SSCAN", "ZSCAN"}
    # Command names are always literals, never computed.
    assert not re.search(r"redis\.p?call\(\s*[^'\s]", code)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_no_script_reads_the_server_clock(name: str):
    code = _code_lines(source(name))

    assert not re.search(r"redis\.p?call\(\s*'TIME'", code, re.IGNORECASE)
    assert "os.time" not in code and "os.clock" not in code


def test_an_unknown_script_name_is_refused():
    with pytest.raises(KeyError, match="reserv"):
        source("reserv")


def test_scripts_registers_one_script_per_name_with_its_generated_source():
    client = redis.Redis(host="127.0.0.1", port=1)  # registering scripts sends nothing

    scripts = Scripts(client)

    for name in SCRIPT_NAMES:
        assert getattr(scripts, name).script.script == source(name)
    assert {t.name for t in scripts.all()} == set(SCRIPT_NAMES)
    assert len({getattr(scripts, name).script.sha for name in SCRIPT_NAMES}) == len(SCRIPT_NAMES)


def test_where_names_the_script_and_lua_line_of_an_error_raised_inside_a_script():
    sha = hashlib.sha1(source("reserve").encode()).hexdigest()
    lines = source("reserve").splitlines()
    number = next(i for i, line in enumerate(lines, 1) if "'ZPOPMIN'" in line)
    error = f"can't run this command script: {sha}, on @user_script:{number}."

    assert where(error) == f"reserve.lua (as sent) line {number}: {lines[number - 1].strip()}"
    assert where("script: " + "0" * 40 + ", on @user_script:3.") is None  # not one of ours
    assert where("ERR something else") is None


def test_every_counter_a_script_adds_to_is_a_counter_from_the_preamble():
    counted = set()
    for name in SCRIPT_NAMES:
        code = _code_lines(source(name))
        assert not re.search(r"count\(q, '", code), f"{name}.lua counts under a literal name"
        counted |= set(re.findall(r"count\(q, STAT_([A-Z_]+)", code))
    assert counted <= {c.name for c in Counter}
    assert {c.name for c in Counter} == counted  # and no counter is Python's alone


def test_the_reasons_the_scripts_write_come_from_the_preamble():
    code = _code_lines(_raw("reserve.lua"))
    assert "REASON_POISON" in code and "REASON_MISSING_BODY" in code
    assert "'poison'" not in code and "'missing-body'" not in code
