"""Job and row statuses, and the job as every endpoint (and the callback) shows it."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from server.db.job_models import Job

RUNNING = ("Queued", "In progress")  # a job with rows for workers to claim
# A job started with data_upload=url has no rows until its upload URL receives them; it holds
# its batch meanwhile (a second start is refused or joins it) but workers never see it. Unused
# until its URL expires, it ends Expired.
WAITING = "Waiting for data"
EXPIRED = "Expired"
ACTIVE = (WAITING, *RUNNING)  # a job that holds its batch: what a duplicate start, drop and cleanup see
FINISHED = ("Completed", "Completed with errors", "Cancelled", "Failed", EXPIRED)

# Row statuses in the database -> as /result shows them. A claimed row is still to do.
ROW_STATUS = {"pending": "pending", "claimed": "pending", "done": "succeeded", "error": "errored",
              "skipped": "skipped"}


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and ``Z``, as in the seed (``2021-06-25T13:13:10.477Z``)."""
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# What job_json reads: it takes a row of these as it takes a Job (a status poll reads them alone).
JOB_JSON_COLUMNS = (Job.batch_id, Job.job_id, Job.status, Job.started, Job.finished, Job.succeeded_count,
                    Job.errored_count, Job.total_count, Job.strategy, Job.reason)


def job_json(job: Job | Row[Any]) -> dict[str, Any]:
    """The seed's keys + totalCount, strategy (and reason once cancelled or failed), of a Job
    or of a row of JOB_JSON_COLUMNS."""
    out: dict[str, Any] = {
        "batch_id": job.batch_id,
        "job_id": job.job_id,
        "status": job.status,
        "started": iso(job.started),
        "finished": iso(job.finished),
        "succeededCount": job.succeeded_count,
        "erroredCount": job.errored_count,
        "totalCount": job.total_count,
        "strategy": job.strategy,
    }
    if job.reason:
        out["reason"] = job.reason
    return out


def row_label(idx: int, reference_id: Any) -> str:
    """How a log line names a row: its index and its reference_id, escaped (JSON, ASCII: no
    control character reaches a log reader's terminal) and cut to 128 characters."""
    if isinstance(reference_id, str) and reference_id:
        return f"row {idx} (reference_id {json.dumps(reference_id[:128])})"
    return f"row {idx} (no reference_id)"
