"""infra/aqua-pipeline.yaml and the Dockerfile: linters, the env-var contract with settings.py, and a real
CloudFormation deployment of the data plane into the moto server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session
from pydantic import BaseModel

from pipeline.aws import AwsClients, client_kwargs
from pipeline.settings import ENV_PREFIX, AwsSettings, Settings, load_settings
from pipeline.testing.cfn import TEMPLATE_PATH, delete_stack, deploy_data_plane, load_template, settings_env

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent

DATA_PLANE_TYPES = {
    "AWS::S3::Bucket",
    "AWS::S3::BucketPolicy",
    "AWS::SQS::Queue",
    "AWS::SQS::QueuePolicy",
    "AWS::SNS::Topic",
    "AWS::SNS::Subscription",
    "AWS::DynamoDB::Table",
    "AWS::CloudWatch::Alarm",
}


def _tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (it comes with the dev extra: pip install -e '.[dev]')")
    return found


def _task_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = load_template()["Resources"]["TaskDefinition"]["Properties"][
        "ContainerDefinitions"
    ]
    assert len(containers) == 1
    return containers[0]


def _env_entries(container: dict[str, Any]) -> list[dict[str, Any]]:
    """Environment entries, unwrapping ``Fn::If [cond, entry, AWS::NoValue]``."""
    out = []
    for e in container["Environment"]:
        if "Fn::If" in e:
            e = e["Fn::If"][1]
        out.append(e)
    return out


def _setting_exists(var: str) -> bool:
    """Does ``AQUA_PIPELINE_A__B`` name a field of :class:`Settings` (``a.b``)?"""
    assert var.startswith(ENV_PREFIX), var
    model: type[BaseModel] = Settings
    parts = var[len(ENV_PREFIX) :].lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            ann = field.annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


# -- linters ----------------------------------------------------------------------------------------------------


def test_cfn_lint_is_clean() -> None:
    proc = subprocess.run([_tool("cfn-lint"), str(TEMPLATE_PATH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_is_clean() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


# -- the template's contract with settings.py ---------------------------------------------------------------------


def test_every_container_variable_is_a_setting() -> None:
    c = _task_container()
    names = [e["Name"] for e in _env_entries(c)] + [s["Name"] for s in c["Secrets"]]
    assert len(names) == len(set(names)), "a variable is set twice"
    unknown = [n for n in names if not _setting_exists(n)]
    assert unknown == []
    # The ones the service cannot run without in AWS are all wired.
    for required in (
        "AQUA_PIPELINE_S3__BUCKET",
        "AQUA_PIPELINE_QUEUE__WORK_QUEUE_URL",
        "AQUA_PIPELINE_EVENTS__TOPIC_ARN",
        "AQUA_PIPELINE_LEDGER__TABLE_NAME",
        "AQUA_PIPELINE_HTTP__PORT",
        "AQUA_PIPELINE_HTTP__PUBLIC_BASE_URL",
    ):
        assert required in names


def test_secrets_come_from_secrets_manager_parameters() -> None:
    secrets = {s["Name"]: s["ValueFrom"] for s in _task_container()["Secrets"]}
    assert secrets == {
        "AQUA_PIPELINE_AQUA__CLIENT_SECRET": {"Ref": "ZuoraClientSecretArn"},
        "AQUA_PIPELINE_SECURITY__SIGNING_KEYS": {"Ref": "SigningKeysSecretArn"},
        "AQUA_PIPELINE_SECURITY__ADMIN_TOKEN": {"Ref": "AdminTokenSecretArn"},
    }
    params = load_template()["Parameters"]
    for ref in secrets.values():
        assert "Default" not in params[ref["Ref"]]
        assert "secretsmanager" in params[ref["Ref"]]["AllowedPattern"]


def test_literal_and_default_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the template sets as literals, or from parameter defaults, passes the settings validation."""
    params = load_template()["Parameters"]
    env = {}
    for e in _env_entries(_task_container()):
        value = e["Value"]
        if isinstance(value, dict) and "Ref" in value and value["Ref"] in params:
            value = params[value["Ref"]].get("Default")
        if isinstance(value, str | int) and not isinstance(value, bool):
            env[e["Name"]] = str(value)
    assert "AQUA_PIPELINE_SECURITY__TRUSTED_PROXIES" in env  # JSON list defaults are checked too
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    assert settings.http.port == 8080
    assert settings.http.callback_path == "/callbacks/aqua"
    assert settings.queue.max_receives == int(params["MaxReceiveCount"]["Default"])
    assert settings.queue.visibility_timeout_s == int(params["VisibilityTimeout"]["Default"])
    assert settings.s3.prefix == params["ResultsPrefix"]["Default"]
    assert settings.security.trusted_proxies == []


def test_settings_env_maps_outputs_to_real_settings() -> None:
    outputs = {k: f"value-{k}" for k in load_template()["Outputs"]}
    env = settings_env(outputs)
    assert env["AQUA_PIPELINE_S3__BUCKET"] == "value-BucketName"
    assert env["AQUA_PIPELINE_QUEUE__WORK_QUEUE_URL"] == "value-WorkQueueUrl"
    assert all(_setting_exists(k) for k in env)


def test_compute_is_conditional_and_data_plane_is_not() -> None:
    t = load_template()
    for name, res in t["Resources"].items():
        if res["Type"] in DATA_PLANE_TYPES:
            assert res.get("Condition") in (None, "HasExampleSubscriber"), name
        else:
            assert res.get("Condition") in ("IsFull", "FullWithAdminIngress"), name
    full_outputs = {k for k, v in t["Outputs"].items() if v.get("Condition") == "IsFull"}
    assert {"LoadBalancerDnsName", "CallbackBaseUrl"} <= full_outputs


def test_alb_health_check_and_https_redirect() -> None:
    r = load_template()["Resources"]
    assert r["TargetGroup"]["Properties"]["HealthCheckPath"] == "/readyz"  # traffic only to a ready task
    (container,) = r["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert "/healthz" in container["HealthCheck"]["Command"][-1]  # liveness: not killed for an AWS outage
    assert container["LinuxParameters"]["InitProcessEnabled"] is True  # a second SIGTERM reaches the service
    assert r["HttpsListener"]["Properties"]["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]
    redirect = r["HttpListener"]["Properties"]["DefaultActions"][0]
    assert redirect["Type"] == "redirect"
    assert redirect["RedirectConfig"]["Protocol"] == "HTTPS"
    paths = r["CallbackListenerRule"]["Properties"]["Conditions"][0]["PathPatternConfig"]["Values"]
    assert Settings().http.callback_path in paths


def test_task_role_is_scoped_to_the_prefix() -> None:
    statements = load_template()["Resources"]["TaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements if isinstance(s, dict) and "Sid" in s}
    assert by_sid["ResultsUnderPrefix"]["Resource"] == {"Fn::Sub": "${ResultsBucket.Arn}/${ResultsPrefix}/*"}
    assert "s3:DeleteObject" not in by_sid["ResultsUnderPrefix"]["Action"]
    assert by_sid["CompletionEvents"]["Resource"] == {"Ref": "EventsTopic"}
    # what the code calls: the stale-upload sweep lists uploads; the ledger gets, updates (transactions too), scans
    assert "s3:ListBucketMultipartUploads" in by_sid["BucketProbe"]["Action"]
    assert set(by_sid["JobLedger"]["Action"]) == {"dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Scan"}
    for s in by_sid.values():
        assert "*" not in str(s["Action"]), s["Sid"]


# -- the Dockerfile -----------------------------------------------------------------------------------------------


def test_dockerfile_runs_serve_as_non_root_with_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS builder$", text, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    user = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^EXPOSE 8080$", runtime, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", runtime, re.M)
    assert 'ENTRYPOINT ["python", "-m", "pipeline"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    # One source of truth for the install: the script tests/test_container.py runs too.
    assert "infra/docker-install.sh /opt/venv /src" in text
    assert "!infra/docker-install.sh" in (ROOT / ".dockerignore").read_text().splitlines()


# -- deploying the data plane into moto ---------------------------------------------------------------------------


@pytest.fixture
async def aws_extra(aws_settings: AwsSettings) -> AsyncIterator[dict[str, Any]]:
    """CloudFormation and CloudWatch clients (not in AwsClients), built like the others."""
    async with AsyncExitStack() as stack:
        kw = client_kwargs(aws_settings)
        yield {
            name: await stack.enter_async_context(get_session().create_client(name, **kw))
            for name in ("cloudformation", "cloudwatch")
        }


async def test_data_plane_deploys_with_everything_the_template_declares(
    aws_settings: AwsSettings, aws: AwsClients, aws_extra: dict[str, Any], unique: str
) -> None:
    stack = f"aqp-{unique}"
    out = await deploy_data_plane(aws_settings, stack)
    try:
        for key in (
            "BucketName",
            "WorkQueueUrl",
            "DeadLetterQueueUrl",
            "EventsTopicArn",
            "LedgerTableName",
            "ExampleSubscriberQueueUrl",
        ):
            assert out.get(key), key
        assert "LoadBalancerDnsName" not in out  # compute is off in data-plane mode

        resources = await aws_extra["cloudformation"].list_stack_resources(StackName=stack)
        types = {r["ResourceType"] for r in resources["StackResourceSummaries"] if r["ResourceType"]}
        assert types and types <= DATA_PLANE_TYPES

        # Work queue -> DLQ redrive.
        attrs = (await aws.sqs.get_queue_attributes(QueueUrl=out["WorkQueueUrl"], AttributeNames=["All"]))["Attributes"]
        dlq_arn = (await aws.sqs.get_queue_attributes(QueueUrl=out["DeadLetterQueueUrl"], AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
        assert orjson.loads(attrs["RedrivePolicy"]) == {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 5}
        assert attrs["VisibilityTimeout"] == "60"

        # Ledger: pk job_id, on demand, TTL on expires_at, PITR.
        table = (await aws.dynamodb.describe_table(TableName=out["LedgerTableName"]))["Table"]
        assert table["KeySchema"] == [{"AttributeName": "job_id", "KeyType": "HASH"}]
        assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        ttl = (await aws.dynamodb.describe_time_to_live(TableName=out["LedgerTableName"]))["TimeToLiveDescription"]
        assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
        backups = await aws.dynamodb.describe_continuous_backups(TableName=out["LedgerTableName"])
        pitr = backups["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]
        assert pitr["PointInTimeRecoveryStatus"] == "ENABLED"

        # Bucket: encryption, lifecycle, public access block, TLS-only policy.
        bucket = out["BucketName"]
        enc = (await aws.s3.get_bucket_encryption(Bucket=bucket))["ServerSideEncryptionConfiguration"]["Rules"]
        assert enc[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        rules = {r["ID"]: r for r in (await aws.s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]}
        abort = rules["abort-incomplete-multipart-uploads"]
        assert abort["Status"] == "Enabled"
        assert abort["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
        assert rules["expire-results"]["Status"] == "Disabled"  # ResultsExpirationDays=0 keeps results
        pab = (await aws.s3.get_public_access_block(Bucket=bucket))["PublicAccessBlockConfiguration"]
        assert all(pab.values()) and len(pab) == 4
        policy = orjson.loads((await aws.s3.get_bucket_policy(Bucket=bucket))["Policy"])
        deny = policy["Statement"][0]
        assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

        # SNS -> example SQS subscriber, raw delivery: a published event arrives as is.
        subs = (await aws.sns.list_subscriptions_by_topic(TopicArn=out["EventsTopicArn"]))["Subscriptions"]
        assert [(s["Protocol"], s["Endpoint"].rsplit(":", 1)[-1]) for s in subs] == [("sqs", f"{stack}-events-example")]
        await aws.sns.publish(TopicArn=out["EventsTopicArn"], Message='{"type":"probe"}')
        got = await aws.sqs.receive_message(QueueUrl=out["ExampleSubscriberQueueUrl"], WaitTimeSeconds=2)
        assert [m["Body"] for m in got["Messages"]] == ['{"type":"probe"}']

        # Alarms on the DLQ and on the age of the oldest work message.
        alarms = (await aws_extra["cloudwatch"].describe_alarms(AlarmNamePrefix=f"{stack}-"))["MetricAlarms"]
        by_metric = {(a["Dimensions"][0]["Value"], a["MetricName"]): a for a in alarms}
        dlq = by_metric[(f"{stack}-work-dlq", "ApproximateNumberOfMessagesVisible")]
        assert dlq["Threshold"] == 0 and dlq["ComparisonOperator"] == "GreaterThanThreshold"
        age = by_metric[(f"{stack}-work", "ApproximateAgeOfOldestMessage")]
        assert age["Threshold"] == 900
    finally:
        await delete_stack(aws_settings, stack)


async def test_data_plane_parameters_change_what_is_created(
    aws_settings: AwsSettings, aws: AwsClients, unique: str
) -> None:
    stack = f"aqp-{unique}"
    out = await deploy_data_plane(
        aws_settings,
        stack,
        {
            "BucketEncryption": "aws:kms",
            "ResultsExpirationDays": "90",
            "ResultsPrefix": "exports/aqua",
            "MaxReceiveCount": "3",
            "CreateExampleSubscriber": "false",
        },
    )
    try:
        assert "ExampleSubscriberQueueUrl" not in out
        assert (await aws.sns.list_subscriptions_by_topic(TopicArn=out["EventsTopicArn"]))["Subscriptions"] == []
        bucket = out["BucketName"]
        enc = (await aws.s3.get_bucket_encryption(Bucket=bucket))["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert enc["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"
        rules = {r["ID"]: r for r in (await aws.s3.get_bucket_lifecycle_configuration(Bucket=bucket))["Rules"]}
        expire = rules["expire-results"]
        assert (expire["Status"], expire["Expiration"], expire["Filter"]) == (
            "Enabled",
            {"Days": 90},
            {"Prefix": "exports/aqua/"},
        )
        attrs = await aws.sqs.get_queue_attributes(QueueUrl=out["WorkQueueUrl"], AttributeNames=["RedrivePolicy"])
        assert orjson.loads(attrs["Attributes"]["RedrivePolicy"])["maxReceiveCount"] == 3
        assert settings_env(out)["AQUA_PIPELINE_S3__PREFIX"] == "exports/aqua"
    finally:
        await delete_stack(aws_settings, stack)
