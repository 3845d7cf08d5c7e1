"""Job definition files: formats, shapes, key spellings, our own keys, and every kind of refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.aqua.validation import validate_submit
from pipeline.jobdefs import JobDefinition, JobDefinitionError, load_job_definitions, parse_job_definitions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "jobs"

ACCOUNT_QUERY = {"name": "Account", "query": "select Id, Name from Account", "type": "zoqlexport"}


def job(**kw: Any) -> dict[str, Any]:
    return {"name": "nightly", "format": "csv", "version": "1.0", "queries": [ACCOUNT_QUERY], **kw}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(exc: pytest.ExceptionInfo[JobDefinitionError]) -> list[str]:
    return exc.value.problems


# --- the shipped examples -----------------------------------------------------------------------------------


def test_example_accounts() -> None:
    [d] = load_job_definitions(EXAMPLES / "accounts.yaml", check_fields=True)
    body = d.request.to_body()
    assert body["version"] == "1.0" and body["format"] == "csv" and body["useQueryLabels"] is True
    assert [q["name"] for q in body["queries"]] == ["Account", "Invoice"]
    assert not d.request.stateful
    assert "notifyUrl" not in body
    assert d.source.endswith("accounts.yaml#0")


def test_example_stateful() -> None:
    [d] = load_job_definitions(EXAMPLES / "stateful.yaml", check_fields=True)
    assert d.request.stateful and d.request.format == "gzip"
    assert all(q.deleted is not None and q.deleted.column == "IsDeleted" for q in d.request.queries or [])
    assert validate_submit(d.request.to_body()) == []


# --- formats and shapes ---------------------------------------------------------------------------------------


def test_json_single_job(tmp_path: Path) -> None:
    path = write(tmp_path, "job.json", json.dumps(job()))
    [d] = load_job_definitions(path)
    assert isinstance(d, JobDefinition)
    assert d.request.name == "nightly" and d.entity_ids is None and d.idempotency_key is None


def test_yaml_list_of_jobs(tmp_path: Path) -> None:
    text = """
- name: a
  queries: [{name: Account, query: select Id from Account}]
- name: b
  queries: [{name: Invoice, query: select Id from Invoice}]
"""
    defs = load_job_definitions(write(tmp_path, "jobs.yml", text))
    assert [d.request.name for d in defs] == ["a", "b"]
    assert [d.source.rsplit("#", 1)[1] for d in defs] == ["0", "1"]


def test_jobs_key(tmp_path: Path) -> None:
    path = write(tmp_path, "jobs.json", json.dumps({"jobs": [job(name="a"), job(name="b")]}))
    assert [d.request.name for d in load_job_definitions(path)] == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        (json.dumps(job(name="sniffed")), "sniffed"),
        ("name: sniffed\nqueries:\n  - {name: A, query: select Id from Account}\n", "sniffed"),
    ],
)
def test_sniffing_unknown_extension(tmp_path: Path, text: str, name: str) -> None:
    [d] = load_job_definitions(write(tmp_path, "job.def", text))
    assert d.request.name == name


def test_every_documented_field_in_snake_case(tmp_path: Path) -> None:
    text = """
name: full
version: 1.1
format: GZIP
encrypted: none
partner: p1
project: proj
use_query_labels: "true"
date_time_utc: yes
null_replacement: "NULL"
incremental_time: 2024-06-01 00:00:00
offset: 600
source_data: LIVE
use_last_completed_job_queries: false
entity_ids: [11e643f4-a3ee-8bad-b061-0025904c756d, 22e643f4-a3ee-8bad-b061-0025904c756d]
idempotency_key: run-2024-06-01
queries:
  - name: Account
    query: select Id from Account
    type: zoqlexport
    api_version: "91.0"
    convert_to_currencies: EUR,USD
    deleted: {column: IsDeleted, format: Numeric, force_export: true}
"""
    [d] = load_job_definitions(write(tmp_path, "full.yaml", text))
    body = d.request.to_body()
    assert body == {
        "name": "full",
        "version": "1.1",
        "format": "gzip",
        "encrypted": "none",
        "partner": "p1",
        "project": "proj",
        "useQueryLabels": True,
        "dateTimeUtc": True,
        "nullReplacement": "NULL",
        "incrementalTime": "2024-06-01 00:00:00",
        "offset": 600,
        "sourceData": "LIVE",
        "useLastCompletedJobQueries": False,
        "queries": [
            {
                "name": "Account",
                "query": "select Id from Account",
                "type": "zoqlexport",
                "apiVersion": "91.0",
                "convertToCurrencies": "EUR,USD",
                "deleted": {"column": "IsDeleted", "format": "Numeric", "forceExport": True},
            }
        ],
    }
    assert d.entity_ids == "11e643f4-a3ee-8bad-b061-0025904c756d,22e643f4-a3ee-8bad-b061-0025904c756d"
    assert d.idempotency_key == "run-2024-06-01"


def test_parse_job_definitions_from_data() -> None:
    [d] = parse_job_definitions(job(entityIds="abc-123"), source="request body")
    assert d.entity_ids == "abc-123" and d.source == "request body#0"


# --- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["notifyUrl", "notify_url"])
def test_notify_url_refused_with_reason(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, "job.json", json.dumps(job(**{key: "https://x.example/cb?jobId=${JOBID}&status=${STATUS}"})))
    with pytest.raises(JobDefinitionError) as exc:
        load_job_definitions(path)
    [line] = problems(exc)
    assert line.startswith("job 0 (nightly): notifyUrl is not allowed")
    assert "token" in line and "PUBLIC_BASE_URL" in line


def test_all_problems_collected_with_file_job_and_line(tmp_path: Path) -> None:
    jobs = [
        job(name="good"),
        job(name="x" * 40, formt="csv"),
        {"queries": [{"name": "Q", "query": "selec nothing"}], "version": "1.0"},
        "not a job",
    ]
    path = write(tmp_path, "jobs.json", json.dumps({"jobs": jobs}))
    with pytest.raises(JobDefinitionError) as exc:
        load_job_definitions(path)
    message = str(exc.value)
    lines = message.splitlines()
    assert lines[0] == f"invalid job definitions in {path}:"
    assert any(line.strip() == f"job 1 ({'x' * 40}): formt: unknown key" for line in lines)
    assert any(line.strip().startswith(f"job 1 ({'x' * 40}): name must be a string of at most 32") for line in lines)
    assert any("job 2: There is a syntax error" in line and "(AQuA error 90005)" in line for line in lines)
    assert any(line.strip() == "job 3: must be a mapping" for line in lines)
    assert not any("job 0" in line for line in lines)
    assert len(lines) == 1 + len(problems(exc))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"queries": []}, "(AQuA error 90016)"),
        ({"queries": [{**ACCOUNT_QUERY, "deleted": {"column": "D"}}]}, "(AQuA error 90012)"),
        ({"version": "1.1", "partner": "p", "project": "q", "offset": 9999}, "offset must be an integer between"),
        ({"format": "xml"}, "format must be one of"),
        ({"format": "tsv"}, "format must be one of csv, zip, gzip"),  # the simulator's extension, not AQuA's
        ({"queries": [{**ACCOUNT_QUERY, "type": "sql"}]}, "query type must be zoql or zoqlexport"),
        ({"queries": [{**ACCOUNT_QUERY, "colour": "red"}]}, "queries[0].colour: unknown key"),
        (
            {"queries": [{**ACCOUNT_QUERY, "deleted": {"column": "D", "fmt": "x"}}]},
            "queries[0].deleted.fmt: unknown key",
        ),
        ({"queries": "select Id from Account"}, "queries: must be a list"),
        ({"queries": ["select Id from Account"]}, "queries[0]: must be a mapping"),
        ({"nullReplacement": 5}, "nullReplacement: Input should be a valid string"),
        ({"entityIds": "bad id\r\nX-Evil: 1"}, "entityIds: must be"),
        ({"idempotencyKey": "has space"}, "idempotencyKey: must be"),
        ({"idempotencyKey": "k" * 256}, "idempotencyKey: must be"),
        ({"useQueryLabels": True, "use_query_labels": False}, "given twice"),
        ({"sourceData": "SANDBOX"}, "sourceData must be LIVE"),  # REFERENCE.md §3.1: LIVE only
        # AQuA would take these and run them stateless; this pipeline asks for both or neither
        ({"version": "1.1", "partner": "p"}, "partner is set without project: AQuA would run the job stateless"),
        ({"version": "1.2", "project": "q"}, "project is set without partner: AQuA would run the job stateless"),
        ({"version": True}, "version must be one of"),  # not read as 1.0
        (  # object names are case-insensitive: processedusage is ProcessedUsage, which has no deleted rows
            {
                "version": "1.1",
                "partner": "p",
                "project": "q",
                "queries": [{**ACCOUNT_QUERY, "query": "select Id from processedusage", "deleted": {"column": "D"}}],
            },
            "(AQuA error 90017)",
        ),
    ],
)
def test_single_problem(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(JobDefinitionError) as exc:
        parse_job_definitions(job(**changes), source="t")
    assert any(expected in p for p in problems(exc)), problems(exc)


def test_model_error_not_repeated_when_aqua_names_the_field() -> None:
    with pytest.raises(JobDefinitionError) as exc:
        parse_job_definitions(job(format="xml"), source="t")
    assert len(problems(exc)) == 1, problems(exc)


def test_duplicate_idempotency_key_across_jobs() -> None:
    with pytest.raises(JobDefinitionError) as exc:
        parse_job_definitions([job(name="a", idempotencyKey="k1"), job(name="b", idempotencyKey="k1")], source="t")
    assert problems(exc) == ["job 1 (b): idempotencyKey: also used by job 0"]


def test_check_fields_uses_simulator_catalog() -> None:
    data = job(queries=[{"name": "Q", "query": "select Nope from Account"}])
    assert parse_job_definitions(data, source="t")  # not checked by default: a real tenant has other fields
    with pytest.raises(JobDefinitionError, match="noSuchFieldId"):
        parse_job_definitions(data, source="t", check_fields=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "expected a job"),
        ("[]", "no jobs defined"),
        ("jobs: {}", "jobs: must be a list"),
        ("jobs: []\nextra: 1", "unexpected top-level keys next to jobs: extra"),
        ("name: [unclosed", "cannot parse the file"),
        ("42", "expected a job"),
        ("name: !!binary aGVsbG8=\nqueries: []", "only strings, numbers"),
        ("{1: 2}", "cannot parse"),
    ],
)
def test_file_level_problems(tmp_path: Path, text: str, expected: str) -> None:
    suffix = ".json" if text.startswith("{1") else ".yaml"
    with pytest.raises(JobDefinitionError) as exc:
        load_job_definitions(write(tmp_path, "f" + suffix, text))
    assert any(expected in p for p in problems(exc)), problems(exc)


def test_yaml_int_keys_refused(tmp_path: Path) -> None:
    with pytest.raises(JobDefinitionError, match="string keys"):
        load_job_definitions(write(tmp_path, "f.yaml", "1: 2\n"))


def test_yaml_alias_bomb_refused(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(JobDefinitionError, match="more than 100000 values"):
        load_job_definitions(write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n"))


def test_yaml_python_tags_refused(tmp_path: Path) -> None:
    with pytest.raises(JobDefinitionError, match="cannot parse"):
        load_job_definitions(write(tmp_path, "evil.yaml", "name: !!python/object/apply:os.system ['true']\n"))


def test_unreadable_and_oversized_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(JobDefinitionError, match="cannot read the file"):
        load_job_definitions(tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(JobDefinitionError, match="larger than"):
        load_job_definitions(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(JobDefinitionError, match="not UTF-8"):
        load_job_definitions(binary)


def test_deeply_nested_refused(tmp_path: Path) -> None:
    with pytest.raises(JobDefinitionError, match=r"nested too deeply|cannot parse"):
        load_job_definitions(write(tmp_path, "deep.yaml", "[" * 5000 + "]" * 5000))


def test_yaml_timestamp_with_zone_is_not_silently_shifted(tmp_path: Path) -> None:
    text = "version: '1.1'\npartner: p\nproject: q\nincrementalTime: 2024-06-01 00:00:00+02:00\n"
    with pytest.raises(JobDefinitionError, match="90015"):
        load_job_definitions(write(tmp_path, "tz.yaml", text))
