"""The SDK's channel rules, without any network: idempotency, retries, request ids, metadata."""

from __future__ import annotations

import json

from acsp import _channel, _retry
from acsp.v1 import grant_pb2, metering_pb2, scheduler_pb2

GRANT_SERVICE = grant_pb2.DESCRIPTOR.services_by_name["GrantService"]
SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]
METERING_SERVICE = metering_pb2.DESCRIPTOR.services_by_name["MeteringService"]


def _method(service, name):
    return service.methods_by_name[name]


def test_reads_are_idempotent():
    assert _channel.is_idempotent(_method(GRANT_SERVICE, "GetBalance"))
    assert _channel.is_idempotent(_method(SCHEDULER_SERVICE, "ListJobs"))
    assert _channel.is_idempotent(_method(SCHEDULER_SERVICE, "WatchJobs"))
    assert _channel.is_idempotent(_method(METERING_SERVICE, "QueryUsage"))


def test_mutation_with_request_id_is_idempotent():
    method = _method(GRANT_SERVICE, "PlaceHold")
    assert "request_id" in method.input_type.fields_by_name
    assert _channel.is_idempotent(method)


def test_mutation_without_request_id_is_not_retried():
    non_idempotent = [
        method.name
        for service in (GRANT_SERVICE, SCHEDULER_SERVICE, METERING_SERVICE)
        for method in service.methods
        if "request_id" not in method.input_type.fields_by_name
        and not method.name.startswith(_channel.READ_PREFIXES)
    ]
    config = json.loads(_channel.retry_service_config([GRANT_SERVICE, SCHEDULER_SERVICE]))
    retried = {entry["method"] for entry in config["methodConfig"][0]["name"]}
    for name in non_idempotent:
        assert name not in retried


def test_retry_policy_retries_only_unavailable():
    config = json.loads(_channel.retry_service_config([GRANT_SERVICE]))
    (method_config,) = config["methodConfig"]
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == _channel.MAX_ATTEMPTS
    assert {"service": "acsp.v1.GrantService", "method": "GetBalance"} in method_config["name"]


def test_empty_request_id_is_filled_on_a_copy():
    request = grant_pb2.PlaceHoldRequest()
    filled = _channel._with_request_id(request)
    assert filled.request_id
    assert request.request_id == ""
    assert _channel._with_request_id(filled) is filled


def test_given_request_id_is_kept():
    request = grant_pb2.PlaceHoldRequest(request_id="hold-7")
    assert _channel._with_request_id(request).request_id == "hold-7"


def test_request_without_request_id_field_is_untouched():
    request = grant_pb2.GetBalanceRequest()
    assert _channel._with_request_id(request) is request


def test_token_goes_into_authorization_metadata():
    merged = _channel._merged_metadata([("x-request-id", "r1")], "tok")
    assert ("authorization", "Bearer tok") in merged
    assert ("x-request-id", "r1") in merged


def test_explicit_authorization_metadata_wins():
    merged = _channel._merged_metadata([("authorization", "Bearer other")], "tok")
    assert merged == [("authorization", "Bearer other")]


def test_credentials_repr_hides_token():
    credentials = _channel.Credentials(token="secret-token-value")
    assert "secret-token-value" not in repr(credentials)


def test_batched_methods_found_by_item_request_ids():
    batches = _retry.batch_methods([GRANT_SERVICE, SCHEDULER_SERVICE, METERING_SERVICE])
    assert batches == {
        "/acsp.v1.GrantService/PlaceHolds": "holds",
        "/acsp.v1.GrantService/ReleaseHolds": "holds",
        "/acsp.v1.GrantService/CommitCharges": "charges",
        "/acsp.v1.SchedulerService/SubmitJobs": "jobs",
    }


def test_batch_retried_only_when_every_item_has_id():
    with_ids = grant_pb2.CommitChargesRequest(
        charges=[grant_pb2.ChargeItem(request_id="c-1"), grant_pb2.ChargeItem(request_id="c-2")]
    )
    one_missing = grant_pb2.CommitChargesRequest(
        charges=[grant_pb2.ChargeItem(request_id="c-1"), grant_pb2.ChargeItem()]
    )
    assert _retry.every_item_has_request_id(with_ids, "charges")
    assert not _retry.every_item_has_request_id(one_missing, "charges")
    assert not _retry.every_item_has_request_id(grant_pb2.CommitChargesRequest(), "charges")


def test_backoff_stays_under_its_ceiling():
    delays = {retry: [_retry.backoff_s(retry) for _ in range(200)] for retry in range(1, 8)}
    for retry, drawn in delays.items():
        ceiling = min(_retry.INITIAL_BACKOFF_S * 2 ** (retry - 1), _retry.MAX_BACKOFF_S)
        assert min(drawn) >= 0
        assert max(drawn) <= ceiling
