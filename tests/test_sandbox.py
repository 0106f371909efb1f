"""The render environment's own attribute lookup answers as the Jinja2 sandbox does; a render
process's memory of assets (FILEDROP_JOB_ASSET_MEMORY) holds over a long life."""

from __future__ import annotations

import re

import pytest
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.app import create_app
from server.jobs.sandbox import LimitedEnvironment
from tests.support.jobs import asset_server, get_json, start_ok, wait_job

DATA = {"num_client": "240 000 1", "items": "a key named like a method", "format": "f", "__class__": "c",
        "nested": {"k": [1, 2]}, "n": 7, "": "empty", "mro": "m"}
NAMES = sorted(set(DATA) | set(dir(dict)) | {"missing", "__dict__", "__subclasses__", "k", "x y"})


def _same(a: object, b: object) -> bool:
    if callable(a) and callable(b):  # bound methods and sandbox wrappers: each lookup makes a new one
        return getattr(a, "__name__", None) == getattr(b, "__name__", None)
    return type(a) is type(b) and (a == b or (repr(a) == repr(b)))


@pytest.mark.parametrize("obj", [DATA, {}, {"k": 1}])
def test_attribute_lookup_on_a_dict_matches_the_sandbox(obj: dict[str, object]) -> None:
    mine, theirs = LimitedEnvironment(4300, 1 << 20), ImmutableSandboxedEnvironment(autoescape=True)
    for name in NAMES:
        a, b = mine.getattr(obj, name), theirs.getattr(obj, name)
        assert _same(a, b), (name, a, b)


def test_templates_see_keys_attributes_and_undefined_as_before() -> None:
    src = ("{{ data.num_client }}|{{ data.items is callable }}|{{ data.missing is undefined }}|"
           "{{ data.nested.k[1] }}|{{ data['items'] }}|{{ data.__class__ is undefined }}|{{ data.n * 6 }}")
    mine = LimitedEnvironment(4300, 1 << 20).from_string(src).render(data=DATA)
    theirs = ImmutableSandboxedEnvironment(autoescape=True).from_string(src).render(data=DATA)
    assert mine == theirs == "240 000 1|True|True|2|a key named like a method|True|42"


# Known ways out of Jinja2's sandbox: str.format and its indirect forms (CVE-2016-10745,
# CVE-2019-10906, CVE-2024-56326, CVE-2025-27516), the globals' and loop's attributes, and
# changing what other rows see (params is one object for every row of a job).
ESCAPES = {
    "format": '{{ "{0.__class__.__mro__}".format(data) }}',
    "format_map": '{{ "{x.__class__}".format_map({"x": data}) }}',
    "format, kept": '{% set f = "{0.__class__}".format %}{{ f(data) }}',
    "format, by attr": '{{ ("{0.__class__}"|attr("format"))(data) }}',
    "format filter": '{{ "%s"|format(data.__class__) }}',
    "cycler": "{{ cycler.__init__.__globals__ }}",
    "joiner": "{{ joiner().__class__.__init__.__globals__ }}",
    "namespace": "{% set n = namespace() %}{{ n.__class__.__mro__ }}{{ n._Namespace__attrs }}",
    "lipsum": '{{ lipsum.__globals__["os"] }}',
    "range": "{{ range.__class__ }}{{ range(1).__class__.__mro__ }}",
    "loop": "{% for x in [1] %}{{ loop.__class__.__mro__ }}{{ loop._iterator }}{% endfor %}",
    "self": "{{ self._TemplateReference__context }}{{ self.__dict__ }}",
    "attr filter": '{{ data|attr("__class__") }}{{ (data|attr("__class__")).__subclasses__() }}',
    "params mutated": '{{ params.update({"x": 1}) }}{{ params.list.append(1) }}',
    "params by namespace": "{% set n = namespace(p=params) %}{{ n.p.pop('list') }}",
}


@pytest.mark.parametrize("src", ESCAPES.values(), ids=ESCAPES.keys())
def test_known_sandbox_escapes_are_refused(src: str) -> None:
    params = {"list": [1]}
    try:
        out = LimitedEnvironment(4300, 1 << 20).from_string(src).render(data={"a": 1}, params=params)
    except SecurityError:
        out = ""
    assert not re.search(r"<class|<function|<module|<built-in|__globals__|object at 0x", out), out
    assert params == {"list": [1]}


async def test_pdfs_embedded_one_per_row_never_exhaust_the_asset_memory(aiohttp_client, settings) -> None:
    """``original`` embeds each row's PDF as a data: URI, which a render process keeps in memory
    within FILEDROP_JOB_ASSET_MEMORY (for its whole life, job after job). Each URI was counted at
    ``size * 4 // 3 + 64`` bytes and uncounted at its length (~34 bytes less) when it made room:
    the count grew with every PDF, the cache emptied, and once the count alone was over the
    budget every row needing an asset failed (``render failed: KeyError: 'dictionary is empty'``)
    until the process was replaced. 2K of memory and 0.5K PDFs: that took ~60 rows a process."""
    client = await aiohttp_client(create_app(settings.replace(job_asset_memory=2048)))
    n = 200
    files = {f"/{i}.pdf": b"%PDF-1.4 " + i.to_bytes(4, "big") * 125 for i in range(n)}
    async with asset_server(files) as srv:
        data = [{"reference_id": f"r{i}", "suffix": f"s{i:020d}", "pdf": srv.url(f"/{i}.pdf")} for i in range(n)]
        job = await start_ok(client, "pdfs", {"body": "x"}, data, strategy="original")
        done = await wait_job(client, "pdfs", job["job_id"], timeout=60)
    errors = [r["error"] for r in (await get_json(client, f"/api/batch/pdfs/{job['job_id']}/result"))["rows"]
              if r["error"]]
    assert (done["status"], done["succeededCount"]) == ("Completed", n), errors[:3]
