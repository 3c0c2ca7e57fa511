"""The OpenAPI document the server publishes, fuzzed with schemathesis against the live server."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.api_stack import API_KEY, Stack

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_every_operation_answers_as_its_schema_says(stack: Stack):
    schema = schemathesis.openapi.from_url(stack.base_url.removesuffix("/v1") + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/files", "GET /v1/files", "GET /v1/files/{file_id}", "GET /v1/files/{file_id}/content",
        "DELETE /v1/files/{file_id}", "POST /v1/batches", "GET /v1/batches", "GET /v1/batches/{batch_id}",
        "POST /v1/batches/{batch_id}/cancel", "GET /v1/models"}
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def answers_as_documented(case):
            # Random ids are unknown ids, so well-formed requests may rightly answer 404: not a failure.
            response = case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
            statuses.append(response.status_code)

        answers_as_documented()
    assert len(statuses) >= 5 * len(operations) and 200 in statuses and {404, 422} <= set(statuses)
