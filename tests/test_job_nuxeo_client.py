"""``SmartLinks.Generate`` from the official ``nuxeo`` 7.1.0 client against a real server: its
``batch.execute`` sends ``X-NXVoidOperation: true`` (a 204, no job id), so the job is found in
the batch's job list; ``uploads.execute(..., void_op=False)`` answers the job itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from nuxeo.client import Nuxeo
from nuxeo.models import FileBlob

from tests.conftest import API_KEY
from tests.support.jobs import rows
from tests.support.live import AUTH, get, wait_end

pytestmark = [
    pytest.mark.timeout(120),
    # As in test_upload_nuxeo_client: the client leaves some responses to the GC.
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"),
]


def test_the_nuxeo_client_starts_a_job_and_finds_it(server_factory, tmp_path: Path) -> None:
    srv = server_factory()
    (tmp_path / "t.json").write_text(json.dumps({"body": "<p>{{ data.n }}</p>"}))
    (tmp_path / "d.json").write_text(json.dumps(rows(3)))
    nx = Nuxeo(host=srv.url + "/nuxeo/", auth=("anyone", API_KEY))
    try:
        batch = nx.uploads.batch()
        batch.upload(FileBlob(str(tmp_path / "t.json"), mimetype="application/json"))
        batch.upload(FileBlob(str(tmp_path / "d.json"), mimetype="application/json"))
        # The client's default: a void operation, answered 204 without the job.
        void = batch.execute("SmartLinks.Generate", params={"template": 0, "data": 1})
        assert void.status_code == 204 and not void.content
        listing = get(srv, f"/api/batch/{batch.uid}/jobs")
        assert len(listing["jobs"]) == 1
        first = listing["jobs"][0]
        assert wait_end(srv, batch.uid, first["job_id"])["status"] == "Completed"
        # void_op=False: the job in the answer (202), here into another smartlink batch id.
        r = nx.uploads.execute(batch, "SmartLinks.Generate", params={"template": 0, "data": 1, "batch_id": "seen"},
                               void_op=False)
        job = r.json()
        assert r.status_code == 202 and job["batch_id"] == "seen" and job["totalCount"] == 3
        assert wait_end(srv, "seen", job["job_id"])["status"] == "Completed"
    finally:
        nx.client.on_exit()
    newest = requests.get(f"{srv.url}/api/batch/seen/jobs", headers=AUTH, timeout=30).json()["jobs"]
    assert [j["job_id"] for j in newest] == [job["job_id"]]
