"""The OpenAPI document and the router describe the same routes; it is served without a key;
every error code the code raises by name is in it; the routes that take a signed URL say so; what
the server answers for ids that are malformed or unknown is documented, status and code; it is a
document schemathesis can load."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import schemathesis

from server.app import create_app
from server.config import Settings
from server.db import utcnow
from server.keys import SIGNED_ROUTES
from server.openapi import EXECUTE_OPERATIONS, build
from server.signing import EXPIRES, KID, SIGNATURE
from tests.conftest import AUTH
from tests.support.jobs import SEED_ROWS, SEED_TEMPLATE, start_ok, wait_job
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
                if status == "503":
                    assert "Retry-After" in r["headers"], (method, path)
    assert responses["Common401"]["headers"]["WWW-Authenticate"]


def codes_of(description: str) -> set[str]:
    """The codes an answer's description lists (``error()``: "... Codes: A, B.")."""
    m = re.search(r"Codes: ([A-Z0-9_, ]+)\.", description)
    return set(m.group(1).split(", ")) if m else set()


def test_job_starts_document_the_checkers_503_with_retry_after(settings: Settings) -> None:
    doc = build(settings)
    starts = [op for ops in doc["paths"].values() for op in ops.values()
              if op["operationId"].startswith(("startJob", "executeSmartLinksGenerate", "executeBatch", "executeFile",
                                               "legacyExecute"))
              and not op["operationId"].startswith("executeBatchManifest")]
    assert len(starts) == 11  # startJob; 2 SmartLinks.Generate, 2 generic and the legacy execute, each x /nuxeo
    for op in starts:
        busy = op["responses"]["503"]
        assert "ERR_SERVER_BUSY" in codes_of(busy["description"]) and "template check" in busy["description"]
        assert busy["headers"]["Retry-After"]


def test_the_routes_that_take_a_signature_offer_it_instead_of_the_key(settings: Settings) -> None:
    doc = build(settings)
    keys = doc["security"]
    scheme = doc["components"]["securitySchemes"]["signedUrl"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "query", SIGNATURE)
    assert {"signedUrl": []} not in keys
    offered = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if {"signedUrl": []} not in op.get("security", keys):
                continue
            offered.add((method.upper(), path))
            assert op["security"] == [*keys, {"signedUrl": []}]  # any one of them: the key still works
            query = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            assert {EXPIRES, KID, SIGNATURE} <= query
            assert "ERR_URL_INVALID" in codes_of(op["responses"]["403"]["description"])
    app = create_app(settings)
    routes = set(app[SIGNED_ROUTES])
    answered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    # A HEAD is judged as the GET it is the head of (server/auth.py, signed_method).
    heads = {("HEAD", path) for method, path in routes if method == "GET" and ("HEAD", path) in answered}
    assert heads and offered == routes | heads


# Path parameters the server refuses (malformed) or finds nothing for (well-formed): the answer's
# status must be documented for the operation, and its code among that status's codes.
MALFORMED = {"batch_id": ["-bad", ".bad", "_bad", "a..b", "a%20b", "x" * 129, "%2e%2e"],
             "file_idx": ["x1", "-1", "1234567890"], "job_id": ["zz", "0" * 33], "handler": [], "operation": []}
UNKNOWN = {"batch_id": "nosuchbatch", "file_idx": "5", "job_id": "0" * 32, "handler": "nope",
           "operation": "No.Such"}


async def test_malformed_and_unknown_ids_answer_documented_statuses_and_codes(client, settings: Settings) -> None:
    doc = build(settings)
    components = doc["components"]["responses"]
    wrong = []
    for path, ops in doc["paths"].items():
        names = re.findall(r"\{(\w+)\}", path)
        variants = [UNKNOWN] + [{**UNKNOWN, name: bad} for name in names for bad in MALFORMED[name]]
        for method, op in ops.items():
            for values in variants:
                url = re.sub(r"\{(\w+)\}", lambda m, v=values: v[m.group(1)], path)  # type: ignore[misc]
                r = await client.request(method.upper(), url, data=b"{}", headers={**AUTH, "X-File-Name": "a"})
                body = await r.read()
                code = json.loads(body).get("code") if r.status >= 400 and body else None
                documented = op["responses"].get(str(r.status))
                if documented and "$ref" in documented:
                    documented = components[documented["$ref"].rsplit("/", 1)[1]]
                if documented is None or (code is not None and code not in codes_of(documented["description"])):
                    wrong.append(f"{method.upper()} {url}: {r.status} {code}")
    assert not wrong, "answers server/openapi.py does not document:\n" + "\n".join(wrong)


async def test_a_method_a_path_does_not_answer_is_the_documented_405(client, settings: Settings) -> None:
    r = await client.patch("/api/limits", headers=AUTH)
    body = await r.json()
    assert (r.status, body["entity-type"], body["code"]) == (405, "exception", "ERR_METHOD_NOT_ALLOWED"), body
    assert r.headers["Allow"] == "GET"
    doc = build(settings)
    described = doc["components"]["responses"]["MethodNotAllowed"]
    assert codes_of(described["description"]) == {"ERR_METHOD_NOT_ALLOWED"} and described["headers"]["Allow"]
    assert "405" in doc["info"]["description"]


def test_every_error_code_raised_by_name_is_documented(settings: Settings) -> None:
    text = json.dumps(build(settings))
    raised = set()
    for f in (REPO / "server").rglob("*.py"):
        raised |= set(re.findall(r'code(?:\s*=\s*|: str = )"(ERR_[A-Z0-9_]+)"', f.read_text()))
    # Codes of the CLI (never an HTTP answer) and base classes' codes no answer carries.
    not_http = {"ERR_KEY_NAME_INVALID", "ERR_KEY_NAME_TAKEN", "ERR_INTERNAL", "ERR_CONFLICT",
                "ERR_REQUEST_INCOMPLETE"}
    missing = sorted(c for c in raised - not_http if c not in text)
    assert not missing, f"error codes raised but not in server/openapi.py: {missing}"


def test_limits_come_from_the_settings() -> None:
    doc = build(Settings(max_chunk_size=3 << 20, max_data_size=7 << 20))
    text = json.dumps(doc)
    assert str(3 << 20) in doc["info"]["description"] and str(7 << 20) in text


async def test_the_documented_names_are_the_ones_the_server_takes_and_gives(client, settings: Settings) -> None:
    """The start's parts and SmartLinks.Generate's params are refused by name when unknown
    (422), so the document and the code must list the same ones; /api/limits answers exactly the
    documented fields."""
    from server.api.jobs import START_PARTS
    from server.jobs.operation import PARAMS
    from server.openapi import LIMITS

    schemas = build(settings)["components"]["schemas"]
    assert set(schemas["StartForm"]["properties"]) == {*START_PARTS, "batch_id"}
    assert set(schemas["SmartLinksParams"]["properties"]) == set(PARAMS)
    assert set(await (await client.get("/api/limits", headers=AUTH)).json()) == set(LIMITS)


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


async def test_a_blank_expires_in_means_the_default_to_the_document_and_the_server(client, settings: Settings) -> None:
    """The server takes a blank ``expires_in`` as an absent one (the default life; passed over
    without format=url on /result): every place the document has it accepts a blank too, or a
    client that follows the document refuses what the server takes (and schemathesis sends it as
    invalid data, expecting a 4xx)."""
    doc = build(settings)
    patterns = {(method, path): p["schema"]["pattern"] for path, ops in doc["paths"].items()
                for method, op in ops.items() for p in op.get("parameters", []) if p["name"] == "expires_in"}
    patterns["StartForm", ""] = doc["components"]["schemas"]["StartForm"]["properties"]["expires_in"]["pattern"]
    result = "/api/batch/{batch_id}/{job_id}/result"
    assert ("get", result) in patterns and ("head", result) in patterns
    assert [k for k, pattern in patterns.items() if not re.search(pattern, "")] == []
    assert [k for k, pattern in patterns.items() if re.search(pattern, "x") or not re.search(pattern, "60")] == []
    job = await start_ok(client, "blankexp", SEED_TEMPLATE, SEED_ROWS)
    await wait_job(client, "blankexp", job["job_id"])
    path = result.format(batch_id="blankexp", job_id=job["job_id"])
    before = utcnow().replace(microsecond=0)
    r = await client.get(f"{path}?format=url&expires_in=", headers=AUTH)
    assert r.status == 200, await r.text()
    expires = datetime.fromisoformat((await r.json())["expires"].rstrip("Z"))
    assert before + timedelta(seconds=settings.download_url_ttl) <= expires
    assert expires <= utcnow() + timedelta(seconds=settings.download_url_ttl + 1)
    r = await client.get(f"{path}?expires_in=", headers=AUTH)
    assert r.status == 200 and (await r.json())["rows"], await r.text()


def _param_schema(doc: dict, path: str, method: str, name: str) -> dict:  # type: ignore[type-arg]
    params = doc["paths"][path][method]["parameters"]
    return next(p["schema"] for p in params if p["name"] == name)


async def test_what_the_document_admits_of_a_request_the_server_takes(client, settings: Settings) -> None:
    """The request schemas say what the server refuses: a client (or schemathesis) that follows
    the document never sends a value it calls valid only to get a 400. Each value below is
    refused by the server; the document must refuse it too, and take its valid neighbour."""
    import jsonschema_rs

    doc = build(settings)
    batch = (await (await client.post("/api/v1/upload", headers=AUTH)).json())["batchId"]
    upload, legacy = "/api/v1/upload/{batch_id}/{file_idx}", "/site/automation/batch/upload"
    wrong = []

    def judge(what: str, schema: dict, value: object, status: int, valid: bool) -> None:  # type: ignore[type-arg]
        admitted = jsonschema_rs.validator_for({**schema, "components": doc["components"]}).is_valid(value)
        if admitted != valid or (status == 400) == valid:
            wrong.append(f"{what} = {value!r}: the server answers {status}, the document "
                         f"{'admits' if admitted else 'refuses'} it")

    for value, valid in (("not a type", False), ("0" * 255, False), ("täxt/plain", False),
                         ("text/plain; charset=utf-8", True)):
        r = await client.post(f"/api/v1/upload/{batch}/0", data=b"abc",
                              headers={**AUTH, "X-File-Name": "a.txt", "X-File-Type": value})
        judge("X-File-Type", _param_schema(doc, upload, "post", "X-File-Type"), value, r.status, valid)
    for value, valid in (("a..b", False), ("a.b", True)):
        r = await client.get(f"/api/v1/upload/{value}", headers=AUTH)
        judge("batch_id", _param_schema(doc, "/api/v1/upload/{batch_id}", "get", "batch_id"), value, r.status, valid)
        r = await client.post(legacy, data=b"abc", headers={**AUTH, "X-Batch-Id": value, "X-File-Idx": "0",
                                                             "X-File-Name": "a.txt"})
        judge("X-Batch-Id", _param_schema(doc, legacy, "post", "X-Batch-Id"), value, r.status, valid)
    body_schema = doc["paths"]["/site/automation/batch/execute"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    for params, valid in (({"operationId": "", "batchId": batch}, False),
                          ({"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": ""}, False),
                          ({"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": "x"}, False),
                          ({"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": -1}, False),
                          ({"operationId": "Batch.Manifest", "batchId": batch, "fileIdx": "0"}, True)):
        r = await client.post("/site/automation/batch/execute", json={"params": params},
                              headers={**AUTH, "X-Batch-No-Drop": "true"})
        judge("legacy execute params", body_schema, {"params": params}, r.status, valid)
    assert not wrong, "the document and the server disagree:\n" + "\n".join(wrong)


async def test_every_field_of_the_upload_answers_is_documented_the_sha256_of_a_complete_file_too(
        client, settings: Settings) -> None:
    """Real upload answers (a whole file, a chunk of a file still incomplete, the chunk that
    completes it, the legacy form's) are valid against ``Uploaded`` with no field left out of it:
    the optional ``sha256`` of a complete file is described, as 64 lowercase hex digits."""
    import hashlib

    import jsonschema_rs

    doc = build(settings)
    uploaded = doc["components"]["schemas"]["Uploaded"]
    schema = {**uploaded, "additionalProperties": False, "components": doc["components"]}
    validator = jsonschema_rs.validator_for(schema)
    assert "sha256" not in uploaded["required"]
    batch = (await (await client.post("/api/v1/upload", headers=AUTH)).json())["batchId"]
    data = b"0123456789" * 300
    head = {**AUTH, "X-File-Name": "a.bin", "X-File-Size": str(len(data))}
    chunk = {**head, "X-Upload-Type": "chunked", "X-Upload-Chunk-Count": "2"}
    answers = [
        await client.post(f"/api/v1/upload/{batch}/0", data=data, headers=head),
        await client.post(f"/api/v1/upload/{batch}/1", data=data[:1500], headers={**chunk, "X-Upload-Chunk-Index": "0"}),
        await client.post(f"/api/v1/upload/{batch}/1", data=data[1500:], headers={**chunk, "X-Upload-Chunk-Index": "1"}),
        await client.post("/site/automation/batch/upload", data=data,
                          headers={**head, "X-Batch-Id": "legacy-doc", "X-File-Idx": "0"}),
    ]
    assert [r.status for r in answers] == [201, 202, 201, 200]
    bodies = [await r.json() for r in answers]
    digest = hashlib.sha256(data).hexdigest()
    assert [b.get("sha256") for b in bodies] == [digest, None, digest, digest]
    for body in bodies:
        assert validator.is_valid(body), (body, list(validator.iter_errors(body)))
    assert not validator.is_valid({**bodies[0], "sha256": digest.upper()})
