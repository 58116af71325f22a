"""The server under a flood of bad requests: every one gets a 4xx, none a 5xx, and a good request
afterwards is still answered. At least 200 of them carry the right key, so that they reach the
body checks rather than stop at the key check, which comes first."""

from __future__ import annotations

import pytest

from helpers import running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from tiny_artifact import tiny_artifact  # noqa: F401

from .flood import KEY, bad_requests, flood, schema_flood, still_answers


@pytest.fixture(scope="module")
def keyed_server(tiny_artifact):  # noqa: F811
    config, artifact = tiny_artifact
    model = model_from_config(load_training_config(config, ("evaluation.max_new_tokens=4",)), adapter=artifact)
    with running(create_app(model, ServeLimits(), api_key=KEY)) as url:
        yield url


def test_the_flood_has_at_least_two_hundred_distinct_authenticated_bad_requests():
    requests = list(bad_requests())
    names = [request.name for request in requests]
    assert len(set(names)) == len(names)
    assert sum(request.authenticated for request in requests) >= 200


def test_hundreds_of_bad_requests_get_4xx_and_a_good_one_is_still_answered(keyed_server):
    result = flood(keyed_server)
    assert result.sent("authenticated") >= 200 and result.sent("unauthenticated") > 0
    assert result.failures == [], "\n".join(result.failures)  # includes: a 401 to the right key
    assert result.server_errors == 0
    assert {404, 405, 413, 422, 400} <= set(result.statuses["authenticated"])
    assert 401 not in result.statuses["authenticated"]
    assert set(result.statuses["unauthenticated"]) == {401, 405}  # 405: /healthz needs no key, but GET
    assert still_answers(keyed_server)


def test_a_flood_of_distinct_json_schemas_leaves_healthz_answering_within_a_second(keyed_server):
    result = schema_flood(keyed_server)
    assert result.healthz_answers >= 5 and result.healthz_max_s < 1.0, result
    assert set(result.statuses) <= {200, 429} and result.statuses[200] >= 8, result.statuses  # 429: retry later
    assert still_answers(keyed_server)
