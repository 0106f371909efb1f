"""The start's template check (``server.jobs.checker``) in real render processes: fair between
API keys (one key's slow templates do not hold up another key's start), bounded per key, and a
template nested too deeply for Python's compiler, or holding a number literal over
FILEDROP_MAX_NUMBER_DIGITS, is the client's 422, not a dead process."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.app import create_app
from server.jobs.checker import CHECKS_WAITING
from server.jobs.childproc import RenderProcess
from server.keys import JOBS
from tests.conftest import OTHER_KEY
from tests.support.jobs import SEED_ROWS, start
from tests.support.waiting import async_wait_until

# Folding this while compiling takes far longer than any FILEDROP_RENDER_TIMEOUT below.
SLOW = {"body": '{{ "ab "|center(600000)|wordwrap(2) }}'}
TRIVIAL = {"body": "<p>{{ data.n }}</p>"}
OTHER = {"X-API-Key": OTHER_KEY}

NESTED = {
    "21 for loops": "{% for a in [1] %}" * 21 + "x" + "{% endfor %}" * 21,  # SyntaxError: statically nested blocks
    "100 ifs": "{% if 1 %}" * 100 + "x" + "{% endif %}" * 100,  # IndentationError
    "100 parentheses": "{{ " + "(" * 100 + "1" + ")" * 100 + " }}",  # RecursionError in Jinja2's parser
    "100 lists": "{{ " + "[" * 100 + "1" + "]" * 100 + " }}",
    "100 dicts": "{{ " + "{'a': " * 100 + "1" + "}" * 100 + " }}",
    "1000 additions": "{{ a" + " + a" * 1000 + " }}",  # RecursionError in the code generator
}


async def checks_queued(client, n: int) -> None:  # type: ignore[no-untyped-def]
    checker = client.app[JOBS].checker

    async def queued() -> bool:
        return checker.checks >= n

    await async_wait_until(queued, timeout=30, what=f"{n} template checks running or waiting")


async def test_one_keys_slow_checks_do_not_hold_up_another_keys_start(aiohttp_client, settings) -> None:
    timeout = 2.0
    client = await aiohttp_client(create_app(settings.replace(render_timeout=timeout)))
    slow = [asyncio.create_task(start(client, f"slow{i}", SLOW, SEED_ROWS, headers=OTHER)) for i in range(3)]
    await checks_queued(client, 3)
    # One at a time for everyone, the trivial start answered after the three slow ones: 6 s.
    t0 = time.monotonic()
    r = await start(client, "trivial", TRIVIAL, SEED_ROWS)
    took = time.monotonic() - t0
    assert r.status == 202, await r.text()
    assert took < timeout, f"the other key's start took {took:.1f} s"
    for resp in await asyncio.gather(*slow):
        body = await resp.json()
        assert resp.status == 422, body
        assert body["message"] == ("document_file: cannot be compiled within the limits: compiling took longer "
                                   f"than FILEDROP_RENDER_TIMEOUT ({timeout:g} s)"), body


async def test_a_key_with_too_many_checks_waiting_is_told_the_limit(aiohttp_client, settings) -> None:
    # 1.2 s: Retry-After rounds FILEDROP_RENDER_TIMEOUT up (2), not the 1 s other busy 503s say.
    client = await aiohttp_client(create_app(settings.replace(render_timeout=1.2)))
    slow = [asyncio.create_task(start(client, f"slow{i}", SLOW, SEED_ROWS, headers=OTHER))
            for i in range(1 + CHECKS_WAITING)]
    await checks_queued(client, 1 + CHECKS_WAITING)
    r = await start(client, "one-more", SLOW, SEED_ROWS, headers=OTHER)
    body = await r.json()
    assert (r.status, body["code"]) == (503, "ERR_SERVER_BUSY"), body
    assert r.headers["Retry-After"] == "2"  # the running check has answered by then
    assert f"at most {CHECKS_WAITING} may wait" in body["message"], body
    assert "FILEDROP_RENDER_TIMEOUT" in body["message"], body
    # Another key is not counted with it.
    r = await start(client, "trivial", TRIVIAL, SEED_ROWS)
    assert r.status == 202, await r.text()
    statuses = [resp.status for resp in await asyncio.gather(*slow)]
    assert statuses == [422] * (1 + CHECKS_WAITING)


async def refused_by_the_warm_checker(client, batch_id: str, body: str) -> dict:  # type: ignore[no-untyped-def]
    """The 422 of a start of ``body`` (for ``document_file``) after a start that warmed the
    checker up; that checker's process answered it and lives on (still warm)."""
    r = await start(client, "warm", TRIVIAL, SEED_ROWS)
    assert r.status == 202, await r.text()
    checker = client.app[JOBS].checker
    pids = checker.pids
    r = await start(client, batch_id, {"body": body}, SEED_ROWS)
    answer = await r.json()
    assert (r.status, answer["code"], answer["field"]) == (422, "ERR_FIELD_INVALID", "document_file"), answer
    assert checker.pids == pids  # the same process, still warm
    return answer


@pytest.mark.parametrize("body", NESTED.values(), ids=NESTED.keys())
async def test_a_template_nested_too_deeply_is_422_and_the_checker_survives(client, body, capfd) -> None:
    answer = await refused_by_the_warm_checker(client, "nested", body)
    assert answer["message"].startswith("document_file: `body` is nested too deeply or is too complex to compile ("), \
        answer
    r = await start(client, "after", TRIVIAL, SEED_ROWS)
    assert r.status == 202, await r.text()
    assert "Traceback" not in capfd.readouterr().err  # the render process's stderr is the server's log


@pytest.mark.parametrize("body", NESTED.values(), ids=NESTED.keys())
async def test_a_workers_render_process_answers_a_nested_template_with_an_error(settings, body) -> None:
    child = await RenderProcess.start(settings)
    try:
        await child.send({"op": "job", "job_id": "j1", "template": json.dumps({"body": body}), "strategy": "smallest",
                          "batch_id": "b1", "params": "{}"})
        header, _ = await child.recv(30)
        assert header["ok"] is False, header
        assert header["error"].startswith("`body` is nested too deeply or is too complex to compile ("), header
        await child.send({"op": "check", "template": json.dumps(TRIVIAL)})
        assert (await child.recv(30))[0]["ok"] is True
        assert child.alive
    finally:
        await child.close()


# Number literals Python will not convert at FILEDROP_MAX_NUMBER_DIGITS (4300 here): int() in
# Jinja2's lexer, or repr() when its code generator writes the constant into Python source.
BIG_NUMBERS = {
    "5000 digits": "{{ " + "9" * 5000 + " }}",
    "negative, in an if": "{% if data.n %}{{ -" + "9" * 5000 + " }}{% endif %}x",
    "20000 hex digits": "{{ 0x" + "f" * 20000 + " }}",
}


@pytest.mark.parametrize("body", BIG_NUMBERS.values(), ids=BIG_NUMBERS.keys())
async def test_a_number_literal_over_the_digit_limit_is_422_naming_it(client, settings, body, capfd) -> None:
    """Was a ValueError out of the render process: its traceback in the server's log, the
    process dead (replaced), and a 422 that blamed FILEDROP_RENDER_MEMORY."""
    answer = await refused_by_the_warm_checker(client, "bignumber", body)
    assert answer["message"] == ("document_file: `body`: number size limit: a number in it has more digits than "
                                 f"FILEDROP_MAX_NUMBER_DIGITS ({settings.max_number_digits})"), answer
    assert "Traceback" not in capfd.readouterr().err  # the render process's stderr is the server's log


# Tags that load another template by name. A smartlink's template is one document and its
# environment has no loader: each passed the start and then failed every row ("render failed:
# TypeError: no loader for this environment specified").
LOADING = {
    "include": ("{% include 'header.html' %}<p>{{ data.n }}</p>", "include"),
    "extends": ("{% extends 'base.html' %}", "extends"),
    "import": ("x\n{% import 'macros.html' as m %}", "import"),
    "from import": ("{% from 'macros.html' import card %}{{ card() }}", "from"),
    "include in an if": ("{% if data.n %}{% include data.n %}{% endif %}x", "include"),
}


@pytest.mark.parametrize(("body", "tag"), LOADING.values(), ids=LOADING.keys())
async def test_a_tag_that_loads_another_template_is_422_at_start(client, body, tag) -> None:
    r = await start(client, "loading", {"body": body}, SEED_ROWS)
    answer = await r.json()
    assert (r.status, answer["code"], answer["field"]) == (422, "ERR_FIELD_INVALID", "document_file"), answer
    line = body[:body.index("{% " + tag)].count("\n") + 1
    assert answer["message"] == (f"document_file: `body` line {line}: {{% {tag} %}} loads another template, and a "
                                 "smartlink template is one document: put what it would load in the template"), answer
    r = await start(client, "loading", {"body": "<p>{% if data %}include{% endif %}</p>"}, SEED_ROWS)
    assert r.status == 202, await r.text()  # the words alone are no tag
