"""The OpenAPI document and the router describe the same routes; it is served without a key;
every error code the code raises by name is in it; it is a document schemathesis can load."""

from __future__ import annotations

import json
import re

import schemathesis

from server.app import create_app
from server.config import Settings
from server.openapi import EXECUTE_OPERATIONS, build
from tests.support.server import REPO


def router_routes(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    return {(route.method, resource.canonical) for resource in app.router.resources() for route in resource}


def document_routes(doc: dict) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    """(METHOD, path) of every operation, a registered operation's literal path mapped back onto
    the generic execute route it is served by."""
    out = set()
    names = "|".join(re.escape(n) for n in EXECUTE_OPERATIONS)
    for path, ops in doc["paths"].items():
        route = re.sub(rf"/execute/(?:{names})$", "/execute/{operation}", path)
        out |= {(method.upper(), route) for method in ops}
    return out


def test_every_route_is_documented_and_every_documented_route_exists(settings: Settings) -> None:
    router = router_routes(settings)
    documented = document_routes(build(settings))
    assert router - documented == set(), "routes missing from server/openapi.py"
    assert documented - router == set(), "documented routes the router does not have"


def test_path_parameters_match_the_path_template(settings: Settings) -> None:
    for path, ops in build(settings)["paths"].items():
        names = set(re.findall(r"\{(\w+)\}", path))
        for method, op in ops.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path)
            assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")


def test_operation_ids_are_unique_and_every_operation_answers_errors_in_the_shape(settings: Settings) -> None:
    doc = build(settings)
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    responses = doc["components"]["responses"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = set(op["responses"])
            assert {"400", "404", "413", "414", "431", "503", "504"} <= statuses, (method, path)
            public = op.get("security") == []
            assert ("401" in statuses) != public, (method, path)
            for status, r in op["responses"].items():
                r = responses[r["$ref"].rsplit("/", 1)[1]] if "$ref" in r else r
                if int(status) >= 400 and status != "401":
                    assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert responses["Common401"]["headers"]["WWW-Authenticate"]


def test_every_error_code_raised_by_name_is_documented(settings: Settings) -> None:
    text = json.dumps(build(settings))
    raised = set()
    for f in (REPO / "server").rglob("*.py"):
        raised |= set(re.findall(r'code(?:\s*=\s*|: str = )"(ERR_[A-Z0-9_]+)"', f.read_text()))
    # Codes of the CLI (never an HTTP answer) and of HTTP answers aiohttp makes for methods
    # and paths that are not routes (405) are not operation answers.
    not_http = {"ERR_KEY_NAME_INVALID", "ERR_KEY_NAME_TAKEN", "ERR_METHOD_NOT_ALLOWED", "ERR_INTERNAL",
                "ERR_CONFLICT", "ERR_REQUEST_INCOMPLETE"}
    missing = sorted(c for c in raised - not_http if c not in text)
    assert not missing, f"error codes raised but not in server/openapi.py: {missing}"


def test_limits_come_from_the_settings() -> None:
    doc = build(Settings(max_chunk_size=3 << 20, max_data_size=7 << 20))
    text = json.dumps(doc)
    assert str(3 << 20) in doc["info"]["description"] and str(7 << 20) in text


async def test_the_document_is_served_without_a_key(client, settings: Settings) -> None:
    r = await client.get("/api/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    assert await r.json() == json.loads(json.dumps(build(settings)))


def test_schemathesis_loads_it_and_sees_every_operation(settings: Settings) -> None:
    doc = build(settings)
    schema = schemathesis.openapi.from_dict(doc)
    count = sum(len(ops) for ops in doc["paths"].values())
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) == count
