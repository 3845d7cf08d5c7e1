"""Key naming (pure) and the create-only manifest store on the real moto server process."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from pipeline.aws import AwsClients
from pipeline.errors import StorageError
from pipeline.manifest import ManifestStore, manifest_key, object_key, sanitize
from pipeline.models import Manifest, ManifestObject
from pipeline.settings import S3Settings

TEMPLATE = S3Settings().key_template
MANIFEST_TEMPLATE = S3Settings().manifest_template
JOB = "2c92c0f8697096be016971cca2091244"


def key(**over: object) -> str:
    fields: dict[str, object] = {
        "prefix": "aqua",
        "partner": "acme",
        "project": "wh",
        "job_name": "nightly",
        "date": date(2025, 1, 2),
        "job_id": JOB,
        "batch_name": "Account",
        "segment": None,
        "ext": "csv",
    }
    fields.update(over)
    return object_key(TEMPLATE, **fields)


def test_object_key_plain() -> None:
    assert key() == f"aqua/acme/wh/nightly/2025-01-02/{JOB}/Account.csv"


def test_object_key_stateless_segment_and_datetime() -> None:
    k = key(partner=None, project=None, segment=1, date=datetime(2025, 1, 2, 23, 59, tzinfo=UTC), ext="csv.gz")
    assert k == f"aqua/_stateless/_stateless/nightly/2025-01-02/{JOB}/Account-00001.csv.gz"
    assert key(job_name=None).split("/")[3] == "-"


@pytest.mark.parametrize(
    ("batch_name", "expected"),
    [
        ("../../etc/passwd", "______etc_passwd"),
        ("..", "__"),
        (".", "_"),
        ("", "_"),
        ("a/b", "a_b"),
        ("/abs", "_abs"),
        ("a\\..\\b", "a____b"),
        ("Rechnungsübersicht 2025", "Rechnungs_bersicht_2025"),
        ("a\x00b\nc", "a_b_c"),
        ("ok.name=v-1_x", "ok.name=v-1_x"),
    ],
)
def test_path_traversal_is_neutralised(batch_name: str, expected: str) -> None:
    k = key(batch_name=batch_name, job_name="../..", partner="..", project="a/../b")
    parts = k.split("/")
    assert parts[-1] == expected + ".csv"
    assert parts[1:4] == ["__", "a____b", "_____"]
    assert ".." not in parts and "." not in parts and "" not in parts
    assert len(parts) == 7


def test_prefix_segments_and_slashes() -> None:
    assert key(prefix="/exports//aqua/").startswith("exports/aqua/acme/")
    assert key(prefix="").startswith("acme/wh/")
    assert key(prefix="x/../y").startswith("x/__/y/")


def test_long_fields_are_truncated_but_stay_distinct() -> None:
    a, b = "A" * 300 + "1", "A" * 300 + "2"
    sa, sb = sanitize(a), sanitize(b)
    assert len(sa) == len(sb) == 120 and sa != sb


def test_missing_field_and_overlong_key() -> None:
    with pytest.raises(ValueError, match="job_id"):
        object_key(TEMPLATE, prefix="p")
    with pytest.raises(ValueError, match="1024"):
        object_key("/".join(f"{{f{i}}}" for i in range(12)), **{f"f{i}": "x" * 119 for i in range(12)})


def test_manifest_key() -> None:
    assert manifest_key(MANIFEST_TEMPLATE, prefix="aqua", job_id="../x") == "aqua/_manifests/___x.json"


def make_manifest(job_id: str = JOB, record_count: int = 3) -> Manifest:
    obj = ManifestObject(
        bucket="b",
        key=key(),
        size=42,
        sha256="0" * 64,
        record_count=record_count,
        batch_id="batch1",
        batch_name="Account",
        query="select Id from Account",
        file_id="f1",
        content_type="text/csv",
    )
    return Manifest(
        job_id=job_id,
        job_name="nightly",
        status="completed",
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        record_count=record_count,
        total_bytes=42,
        objects=[obj],
    )


async def test_commit_is_create_only_and_load_round_trips(aws: AwsClients, bucket: str) -> None:
    store = ManifestStore(aws.s3, bucket, MANIFEST_TEMPLATE, prefix="aqua")
    first = make_manifest(record_count=3)
    k, created = await store.commit(first)
    assert (k, created) == (f"aqua/_manifests/{JOB}.json", True)
    # moto honours If-None-Match: * on PutObject; a second commit neither fails nor overwrites
    k2, created2 = await store.commit(make_manifest(record_count=999))
    assert (k2, created2) == (k, False)
    assert await store.load(k) == first
    head = await aws.s3.head_object(Bucket=bucket, Key=k)
    assert head["ContentType"] == "application/json"


async def test_from_settings_and_sse(aws: AwsClients, bucket: str) -> None:
    store = ManifestStore.from_settings(aws.s3, S3Settings(bucket=bucket, prefix="p/q", sse="AES256"))
    k, created = await store.commit(make_manifest())
    assert created and k == f"p/q/_manifests/{JOB}.json"
    head = await aws.s3.head_object(Bucket=bucket, Key=k)
    assert head["ServerSideEncryption"] == "AES256"


async def test_load_errors(aws: AwsClients, bucket: str) -> None:
    store = ManifestStore(aws.s3, bucket, MANIFEST_TEMPLATE)
    with pytest.raises(StorageError) as info:
        await store.load("nope.json")
    assert info.value.retryable is False
    await aws.s3.put_object(Bucket=bucket, Key="bad.json", Body=b'{"job_id": 1}')
    with pytest.raises(StorageError, match="not valid"):
        await store.load("bad.json")


async def test_commit_to_missing_bucket_is_storage_error(aws: AwsClients, unique: str) -> None:
    store = ManifestStore(aws.s3, f"missing-{unique}", MANIFEST_TEMPLATE)
    with pytest.raises(StorageError) as info:
        await store.commit(make_manifest())
    assert info.value.retryable is True


def test_key_names_keep_plain_names_and_split_the_ones_that_sanitise_alike() -> None:
    from pipeline.aqua.models import Batch
    from pipeline.processor import key_names

    batches = [Batch.model_validate({"name": n}) for n in ("A B", "A/B", "Invoice", "A.B")]
    names = key_names(batches)
    assert names[2:] == ["Invoice", "A.B"]
    assert names[0].startswith("A B_") and names[1].startswith("A/B_") and names[0] != names[1]
    assert len({sanitize(n) for n in names}) == 4


def test_the_manifest_key_date_is_the_jobs_start_date_on_every_attempt() -> None:
    """A retry after midnight must find the manifest the first attempt committed, not write a second one."""
    store = ManifestStore(None, "b", "{prefix}/{date}/{job_id}.json", prefix="aqua")
    first = make_manifest().model_copy(update={"start_time": "2025-03-04T23:58:00+0000"})
    later = first.model_copy(update={"created_at": datetime(2025, 3, 5, 0, 30, tzinfo=UTC)})
    assert store.key_for(first) == store.key_for(later) == f"aqua/2025-03-04/{JOB}.json"
