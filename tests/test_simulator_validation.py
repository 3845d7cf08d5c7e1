"""Submit validation (pure), the documented example bodies vs the models and the simulator, and the CLI."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from pipeline.aqua.models import Job, SubmitRequest
from pipeline.aqua.simulator import SimulatorConfig
from pipeline.aqua.simulator.cli import add_simulator_arguments, build_config
from pipeline.aqua.validation import SIMULATOR_FORMATS, SYNTAX_MESSAGE, ZoqlError, parse_zoql, validate_submit
from tests.test_simulator import Sim, make_sim

__all__ = ["make_sim"]

SimFactory = Callable[..., Awaitable[Sim]]
Q = {"name": "Account", "type": "zoqlexport", "query": "select Id from Account"}

# REFERENCE.md §3.5 (request and response), §3.6, §4.5 (two), §14 (cancel, token) — copied verbatim.
DOC_SUBMIT_REQUEST = """{"format": "csv", "version": "1.0", "name": "nightly-accounts", "encrypted": "none",
  "useQueryLabels": true, "dateTimeUtc": true, "nullReplacement": "",
  "queries": [{"name": "Account", "type": "zoqlexport", "apiVersion": "145.0",
      "query": "select Id, Name, Balance, UpdatedDate from Account where UpdatedDate >= '2025-01-01T00:00:00' and UpdatedDate < '2025-01-02T00:00:00'",
      "deleted": { "column": "IsDeleted", "format": "Boolean", "forceExport": true }}]}"""  # noqa: E501
DOC_SUBMIT_RESPONSE = """{"id": "8a1b2c3d4e5f60718293a4b5c6d7e8f9", "name": "nightly-accounts", "status": "submitted",
  "version": "1.0", "format": "CSV", "encrypted": "none", "useLastCompletedJobQueries": false, "offset": 0,
  "batches": [{"batchId": "8a1b2c3d4e5f60718293a4b5c6d7e8fa", "name": "Account", "batchType": "zoqlexport",
      "apiVersion": "145.0",
      "query": "select Id, Name, Balance, UpdatedDate from Account where UpdatedDate >= '2025-01-01T00:00:00' and UpdatedDate < '2025-01-02T00:00:00'",
      "status": "pending", "localizedStatus": "pending", "recordCount": 0, "full": true,
      "deleted": { "column": "IsDeleted", "format": "Boolean" }}]}"""  # noqa: E501
DOC_ERROR = """{"errorCode": "90005", "message": "There is a syntax error in one of the queries in the AQuA input",
  "status": "error", "name": "nightly-accounts", "version": "1.0", "format": "CSV", "encrypted": "none",
  "useLastCompletedJobQueries": false,
  "batches": [{ "name": "Account", "query": "selec Id frm Account", "batchType": "zoqlexport",
      "apiVersion": "145.0", "status": "pending", "localizedStatus": "pending", "recordCount": 0, "full": true }]}"""
DOC_SEGMENTED = """{"id": "2c9a00aa11bb22cc33dd44ee55ff6601", "name": "acct-sync", "status": "completed", "version": "1.1",
  "format": "GZIP", "encrypted": "none", "partner": "examplepartner", "project": "warehouse-prod",
  "sourceData": "LIVE", "startTime": "2025-03-01 02:00:04", "offset": 0, "useLastCompletedJobQueries": false,
  "batches": [
    {"batchId": "2c9a00aa11bb22cc33dd44ee55ff6602", "name": "Account", "batchType": "zoqlexport",
      "apiVersion": "145.0", "query": "select Id, Name, UpdatedDate from Account",
      "status": "completed", "localizedStatus": "completed", "recordCount": 612345, "full": true, "message": "",
      "segments": ["2c9a00aa11bb22cc33dd44ee55ff6610", "2c9a00aa11bb22cc33dd44ee55ff6611"],
      "deleted": { "column": "IsDeleted", "format": "Boolean" }},
    {"batchId": "2c9a00aa11bb22cc33dd44ee55ff6603", "name": "Subscription", "batchType": "zoqlexport",
      "apiVersion": "145.0", "query": "select Id, Status, UpdatedDate from Subscription",
      "status": "completed", "localizedStatus": "completed", "recordCount": 1804, "full": false, "message": "",
      "fileId": "2c9a00aa11bb22cc33dd44ee55ff6612"}]}"""  # noqa: E501
DOC_ABORTED = """{"id": "2c9a00aa11bb22cc33dd44ee55ff7701", "name": "acct-sync", "status": "aborted",
  "version": "1.1", "format": "CSV", "encrypted": "none", "sourceData": "LIVE", "startTime": "2025-03-01 02:00:04",
  "batches": [{ "batchId": "2c9a00aa11bb22cc33dd44ee55ff7702", "name": "Account", "batchType": "zoqlexport",
      "apiVersion": "145.0", "query": "select Id from Account", "status": "aborted", "recordCount": 0,
      "full": true, "message": "The query exceeded maximum processing time." }]}"""
DOC_CANCELLED = """{ "id": "2c9a00aa11bb22cc33dd44ee55ff8801", "name": "acct-sync", "status": "cancelled", "version": "1.1",
  "format": "CSV", "encrypted": "none", "sourceData": "LIVE",
  "batches": [
    { "batchId": "2c9a00aa11bb22cc33dd44ee55ff8802", "name": "Account", "batchType": "zoqlexport",
      "query": "select Id from Account", "status": "completed", "recordCount": 120, "message": "",
      "fileId": "2c9a00aa11bb22cc33dd44ee55ff8810" },
    { "batchId": "2c9a00aa11bb22cc33dd44ee55ff8803", "name": "Invoice", "batchType": "zoqlexport",
      "query": "select Id from Invoice", "status": "cancelled", "recordCount": 0, "message": "" }]}"""  # noqa: E501


def test_documented_bodies_parse() -> None:
    req = SubmitRequest.model_validate_json(DOC_SUBMIT_REQUEST)
    assert req.queries and req.queries[0].deleted and req.queries[0].deleted.force_export is True
    assert validate_submit(orjson.loads(DOC_SUBMIT_REQUEST)) == []
    assert Job.model_validate_json(DOC_SUBMIT_RESPONSE).batches[0].full is True
    err = Job.model_validate_json(DOC_ERROR)
    assert err.error_code == "90005" and err.id is None
    seg = Job.model_validate_json(DOC_SEGMENTED)
    assert seg.batches[0].file_ids == ["2c9a00aa11bb22cc33dd44ee55ff6610", "2c9a00aa11bb22cc33dd44ee55ff6611"]
    assert Job.model_validate_json(DOC_ABORTED).status == "aborted"
    assert Job.model_validate_json(DOC_CANCELLED).batches[1].status == "cancelled"


def _keys(body: dict[str, Any]) -> set[str]:
    return set(body)


async def test_simulator_bodies_have_the_documented_keys(make_sim: SimFactory) -> None:
    s = await make_sim(SimulatorConfig(step_delay_s=0, rows={"Account": 30, "Subscription": 5}, segment_records=10))
    submitted = await s.submit(orjson.loads(DOC_SUBMIT_REQUEST))
    doc = orjson.loads(DOC_SUBMIT_RESPONSE)
    assert _keys(submitted) == _keys(doc)
    assert _keys(submitted["batches"][0]) == _keys(doc["batches"][0])
    SubmitRequest.model_validate(orjson.loads(DOC_SUBMIT_REQUEST))
    bad = await s.submit({**orjson.loads(DOC_SUBMIT_REQUEST), "queries": [{**Q, "query": "selec Id frm Account"}]})
    assert _keys(bad) == _keys(orjson.loads(DOC_ERROR))
    seg_doc = orjson.loads(DOC_SEGMENTED)
    body = {"format": "gzip", "version": "1.1", "name": "acct-sync", "encrypted": "none", "partner": "examplepartner",
            "project": "warehouse-prod", "queries": [
                {**q, "type": q["batchType"], "deleted": q.get("deleted")} for q in seg_doc["batches"]]}  # fmt: skip
    body["queries"][1].pop("deleted")
    # second query must be incremental like the example: run it once before
    pre = await s.finished((await s.submit({**body, "queries": [body["queries"][1]]}))["id"])
    assert pre["status"] == "completed"
    job = await s.finished((await s.submit(body))["id"])
    parsed = Job.model_validate(job)
    assert parsed.finished and parsed.batches[0].segments and parsed.batches[1].full is False
    assert _keys(job) - {"localizedStatus"} == _keys(seg_doc)
    assert _keys(job["batches"][0]) == _keys(seg_doc["batches"][0])
    assert _keys(job["batches"][1]) == _keys(seg_doc["batches"][1])


def errs(body: dict[str, Any]) -> list[str]:
    return [code for code, _ in validate_submit(body)]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"queries": [Q]}, None),
        ({"version": 1.1, "queries": [Q]}, None),
        ({"version": "2.0", "queries": [Q]}, "90000"),
        ({"name": "x" * 33, "queries": [Q]}, "90000"),
        ({"format": "XML", "queries": [Q]}, "90000"),
        ({"format": "GZIP", "queries": [Q]}, None),
        ({"format": "tsv", "queries": [Q]}, "90000"),  # AQuA's formats: csv, zip, gzip (the simulator adds tsv)
        ({"queries": [{**Q, "type": "sql"}]}, "90000"),
        ({"queries": [{**Q, "name": f"q{i}"} for i in range(51)]}, "90004"),
        ({"queries": [{**Q, "name": f"q{i}"} for i in range(50)]}, None),
        ({"version": "1.0", "queries": []}, "90016"),
        ({"version": "1.0"}, "90016"),
        ({"version": "1.1", "partner": "p", "project": "q"}, None),
        ({"notifyUrl": "http://x/" + "a" * 4991, "queries": [Q]}, "90014"),
        ({"notifyUrl": "http://x/" + "a" * 4990, "queries": [Q]}, None),
        ({"queries": [{**Q, "deleted": {"column": "D", "format": "Boolean"}}]}, "90012"),
        ({"queries": [{**Q, "deleted": {"column": "D", "forceExport": "true"}}]}, None),
        ({"version": "1.1", "partner": "p", "project": "q", "queries": [{**Q, "deleted": {"column": "D"}}]}, None),
        ({"queries": [{"name": "x", "query": "select Id from ProcessedUsage", "deleted": {"column": "D"}}]}, "90017"),
        ({"queries": [{**Q, "deleted": {"column": "D", "format": "boolean", "forceExport": True}}]}, "90000"),
        ({"incrementalTime": "2025-01-01 00:00:00", "queries": [Q]}, "90015"),
        ({"version": "1.1", "partner": "p", "project": "q", "incrementalTime": "2025-01-01", "queries": [Q]}, "90015"),
        ({"version": "1.1", "partner": "p", "project": "q", "incrementalTime": "2025-01-01 10:00:00"}, None),
        ({"offset": 3601, "queries": [Q]}, "90000"),
        ({"offset": 3600, "queries": [Q]}, None),
        ({"version": "1.1", "partner": "p", "queries": [Q]}, None),  # AQuA runs it stateless (REFERENCE.md §3.4)
        ({"version": "1.2", "project": "q", "queries": [Q]}, None),
        ({"queries": [{**Q, "query": "selec Id frm Account"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id from Nope"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id, Bogus from Account"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id, My__c from Account"}]}, None),
        ({"queries": [{**Q, "query": "select Id from Account where"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id from Account where Status = 'Active' and"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id from Account where (Status = 'A' or Balance > 1"}]}, "90005"),
        ({"queries": [{**Q, "query": "select Id from Account where Notes is not null and Id in ('a', 'b')"}]}, None),
        ({"queries": [{**Q, "query": "select Id from Account where " + " or ".join(["Balance > 1"] * 2000)}]}, "90005"),
        ({"queries": [Q, Q]}, "90000"),
    ],
)
def test_validate_submit(body: dict[str, Any], code: str | None) -> None:
    codes = errs(body)
    assert codes == ([] if code is None else [code]) or (code is not None and code in codes), codes


SEED_EXAMPLE = {  # the submit example of the API reference (shared/seeds/aqua-submit-job-api.txt), as sent
    "dateTimeUtc": "true",
    "encrypted": "none",
    "format": "csv",
    "name": "Example",
    "partner": "salesforce",
    "project": "00170000011K3Ub",
    "queries": [
        {
            "name": "AccountingPeriod",
            "query": "select Id,StartDate,EndDate,FiscalYear,Name,Status from AccountingPeriod",
            "type": "zoqlexport",
        }
    ],
    "sourceData": "LIVE",
    "useQueryLabels": "true",
    "version": "1.1",
}


async def test_the_api_references_own_example_is_accepted_and_runs(make_sim: SimFactory) -> None:
    assert validate_submit(SEED_EXAMPLE) == []
    assert validate_submit({**SEED_EXAMPLE, "format": "TSV"}, formats=SIMULATOR_FORMATS) == []
    s = await make_sim()
    job = await s.submit(SEED_EXAMPLE)
    assert job["status"] == "submitted" and job["batches"][0]["name"] == "AccountingPeriod"
    done = await s.finished(job["id"])
    assert done["status"] == "completed" and done["batches"][0]["recordCount"] > 0


def test_parse_zoql_columns_and_joins() -> None:
    q = parse_zoql("SELECT Id, account.Name, BillToContact.WorkEmail FROM account WHERE Balance >= 10")
    assert q.obj == "Account"
    assert [(c.alias, c.source, c.field) for c in q.columns] == [
        (None, "Account", "Id"), (None, "Account", "Name"), ("BillToContact", "Contact", "WorkEmail")]  # fmt: skip
    assert len(parse_zoql("select * from Product").columns) > 5
    with pytest.raises(ZoqlError) as exc:
        parse_zoql("select Nope.Id from Account")
    assert exc.value.code == "90005" and exc.value.message.startswith(SYNTAX_MESSAGE)
    assert validate_submit({"queries": [{**Q, "query": "select X from Custom"}]}, check_fields=False) == []


def test_cli_builds_config() -> None:
    parser = argparse.ArgumentParser()
    add_simulator_arguments(parser)
    args = parser.parse_args(["--port", "0", "--rows", "Account=5", "--rows", "Widget=7", "--step-delay", "0.5",
                              "--fault", "rate_limit_next=3", "--fault", "abort_query=Invoice",
                              "--ui-callout-url", "http://h/c", "--callback-method", "POST"])  # fmt: skip
    cfg = build_config(args)
    assert cfg.rows["Account"] == 5 and cfg.rows["Widget"] == 7 and cfg.rows["Invoice"] == 2000
    assert cfg.step_delay_s == 0.5 and cfg.callback_method == "POST"
    assert cfg.faults.rate_limit_next == 3 and cfg.faults.abort_query == "Invoice"
    assert cfg.ui_callout is not None and cfg.ui_callout.url == "http://h/c"
    with pytest.raises(SystemExit):
        parser.parse_args(["--rows", "nonsense"])
    bad = parser.parse_args(["--step-delay", "-1", "--fault", "cut_file_next=-3", "--fault", "nosuch=1"])
    with pytest.raises(ValueError) as exc:  # one line naming each option, not pydantic's report
        build_config(bad)
    assert str(exc.value) == (
        "--fault cut_file_next: Input should be greater than or equal to 0; --fault nosuch: Extra inputs are not "
        "permitted"
    )
    with pytest.raises(ValueError, match=r"^--step-delay: Input should be greater than or equal to 0$"):
        build_config(parser.parse_args(["--step-delay", "-1"]))
