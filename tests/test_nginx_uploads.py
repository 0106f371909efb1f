"""Contract: the upload suite of the official nuxeo client (tests/test_upload_nuxeo_client.py)
runs unchanged through the real NGINX in front of the real app. Same tests, one fixture swapped:
``server`` is NGINX (its ``url``) instead of the app subprocess."""

from __future__ import annotations

import pytest

from server.config import Settings
from tests import test_upload_nuxeo_client as suite

pytestmark = suite.pytestmark
nuxeo_for = suite.nuxeo_for
# Every test of the suite, collected here a second time against NGINX.
globals().update({name: fn for name, fn in vars(suite).items() if name.startswith("test_") and callable(fn)})


@pytest.fixture
def server(server_factory, nginx_factory):  # type: ignore[no-untyped-def]
    app = server_factory()
    return nginx_factory(Settings.from_env(app.env), app_port=app.port)


def test_the_suite_is_here() -> None:
    assert sum(name.startswith("test_client") for name in globals()) >= 3
