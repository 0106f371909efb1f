"""Messages to the render process: a ``rows`` message carries each row's stored data text as
JSON inside the header, parsed once by the render process. Its answers stay within what its
parent reads (a real render process)."""

from __future__ import annotations

import io
import json

import pytest

from server.config import Settings
from server.jobs.childproc import RenderProcess
from server.jobs.queries import Claimed
from server.jobs.service import prepare_rows
from server.jobs.wire import WireError, encode, encode_rows, read_sync

ROWS = [
    {"reference_id": "a-1", "suffix": "s" * 12, "data": {"name": "Zoë \u2028 \"quoted\" \\ </script>", "n": 10 ** 30}},
    {"reference_id": "b_2", "suffix": "t" * 12, "pdf": "https://x.test/a.pdf?q=\"1\"", "data": {}},
    {"reference_id": "c", "suffix": "u" * 12, "data": {"nested": {"list": [1, 2.5, None, True, {"k": "€"}]}}},
]


def test_a_rows_message_gives_back_each_rows_data_as_the_start_stored_it() -> None:
    records, problems = prepare_rows("j" * 32, ROWS, 8)
    assert not problems
    # NEW_ROW: job_id, idx, reference_id, suffix, pdf, data, ...
    meta = [[r[1], r[2], r[3], r[4]] for r in records]
    message = encode_rows("j" * 32, meta, [r[5] for r in records]) + encode({"op": "next"})
    stream = io.BytesIO(message)
    got = read_sync(stream, 1 << 20, 1 << 20)
    assert got is not None
    header, blobs = got
    assert blobs == [] and header["op"] == "rows" and header["job_id"] == "j" * 32
    assert header["rows"] == [[0, "a-1", "s" * 12, None], [1, "b_2", "t" * 12, "https://x.test/a.pdf?q=\"1\""],
                              [2, "c", "u" * 12, None]]
    assert header["data"] == [r["data"] for r in ROWS]
    nxt = read_sync(stream, 1 << 20, 1 << 20)  # the length prefix covered exactly the header
    assert nxt is not None and nxt[0]["op"] == "next"


def test_a_header_over_the_limit_is_refused() -> None:
    message = encode_rows("j" * 32, [[0, "a", "b", None]], [json.dumps({"x": "y" * 100})])
    with pytest.raises(WireError, match="over the 64-byte limit"):
        read_sync(io.BytesIO(message), 64, 64)


def test_the_start_stores_each_rows_data_as_json_dumps_writes_it() -> None:
    data = [{"f": 1.5, "e": 1e300, "neg": -0.0, "nan": float("nan"), "big": 10 ** 40, "t": True, "z": None,
             "s": "é \u2028 \"q\" \\ \t </script>", "nested": {"l": [[], {}, [1, "2"]]}, "": ""}, {}]
    rows = [{"reference_id": f"r{i}", "suffix": "s" * 12, "data": d} for i, d in enumerate(data)]
    records, _problems = prepare_rows("j" * 32, rows, 8)
    assert [r[5] for r in records] == [json.dumps(d, ensure_ascii=False, separators=(",", ":")) for d in data]


async def test_a_row_whose_asset_urls_no_message_can_carry_is_errored(settings: Settings) -> None:
    """A URL rendered from a row's data may be longer than any answer can carry (1 MiB): that
    row errors saying so, the process lives on and answers the next row (its answer was a message
    the parent refused: the process was killed, the row blamed)."""
    child = await RenderProcess.start(settings)
    try:
        template = {"body": "x", "scripts": [{"src": "https://x.test/{{ data.u }}.js"}]}
        await child.send({"op": "job", "job_id": "j1", "template": json.dumps(template), "strategy": "mixed",
                          "batch_id": "b1", "params": "{}"})
        assert (await child.recv(30))[0]["ok"] is True
        await child.send_rows("j1", [Claimed(0, "r0", "s" * 16, None, json.dumps({"u": "a" * (1 << 20)}), 0),
                                     Claimed(1, "r1", "s" * 16, None, json.dumps({"u": "b"}), 0)])
        answers: list[dict[str, object]] = []
        for _ in range(2):  # one group, or one per row
            if len(answers) < 2:
                answers += (await child.recv(30))[0]["answers"]
        assert answers[0]["status"] == "error", answers[0]
        assert str(answers[0]["error"]).startswith("asset URLs too long: the assets this row needs take 1,048,"), answers[0]
        assert answers[1] == {"idx": 1, "status": "need", "needs": ["url:https://x.test/b.js"]}
        assert child.alive
    finally:
        await child.close()
