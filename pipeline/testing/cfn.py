"""Deploy ``infra/aqua-pipeline.yaml`` through CloudFormation, for tests and the demo against the moto server.

``deploy_data_plane`` creates the template's data-plane resources (bucket, work queue + DLQ, events topic +
example subscriber, ledger table, alarms) with ``DeployMode=data-plane``, so what a test runs against is what the
production template defines. ``settings_env`` turns the stack outputs into the ``AQUA_PIPELINE_*`` variables
that the ECS task definition sets.

moto's CloudFormation creates the bucket (with its encryption), the queues (with the redrive policy), the topic
and the table, but silently skips some resource types and properties. Against an emulator (``endpoint_url`` set)
:func:`deploy_stack` therefore applies exactly those, read from the same template with its intrinsics resolved,
through the service APIs: see ``_EMULATOR_GAPS``. Against real AWS nothing is patched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from pipeline.aws import client_kwargs
from pipeline.settings import ENV_PREFIX, AwsSettings

log = logging.getLogger(__name__)

__all__ = [
    "DATA_PLANE_PARAMETERS",
    "TEMPLATE_PATH",
    "StackError",
    "delete_stack",
    "deploy_data_plane",
    "deploy_stack",
    "load_template",
    "settings_env",
]

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "infra" / "aqua-pipeline.yaml"

# Secret ARNs are required parameters; in data-plane mode nothing reads them.
_UNUSED_SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:aqua-pipeline/unused"
DATA_PLANE_PARAMETERS: Mapping[str, str] = {
    "DeployMode": "data-plane",
    "ZuoraClientSecretArn": _UNUSED_SECRET,
    "SigningKeysSecretArn": _UNUSED_SECRET,
    "AdminTokenSecretArn": _UNUSED_SECRET,
}

# Stack output -> the setting it feeds (the same values the task definition's Environment uses).
_OUTPUT_TO_ENV: Mapping[str, str] = {
    "BucketName": "S3__BUCKET",
    "ResultsPrefix": "S3__PREFIX",
    "WorkQueueUrl": "QUEUE__WORK_QUEUE_URL",
    "WorkQueueName": "QUEUE__WORK_QUEUE_NAME",
    "DeadLetterQueueName": "QUEUE__DLQ_NAME",
    "EventsTopicArn": "EVENTS__TOPIC_ARN",
    "EventsTopicName": "EVENTS__TOPIC_NAME",
    "LedgerTableName": "LEDGER__TABLE_NAME",
    "CallbackBaseUrl": "HTTP__PUBLIC_BASE_URL",
}

# What moto's CloudFormation (5.x) leaves out: resource type -> properties it ignores (None = the whole resource).
_EMULATOR_GAPS: Mapping[str, tuple[str, ...] | None] = {
    "AWS::S3::Bucket": ("LifecycleConfiguration", "PublicAccessBlockConfiguration", "OwnershipControls"),
    "AWS::S3::BucketPolicy": None,
    "AWS::SQS::QueuePolicy": None,
    "AWS::SNS::Subscription": None,
    "AWS::DynamoDB::Table": ("TimeToLiveSpecification", "PointInTimeRecoverySpecification"),
    "AWS::CloudWatch::Alarm": None,
}

_FAILED_SUFFIXES = ("_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_IN_PROGRESS")


class StackError(Exception):
    """The stack did not reach the wanted state; the message carries the failed resources' reasons."""


# -- template loading -------------------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (``!Ref``, ``!GetAtt``, ``!Sub`` ...) as long-form dicts."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref" or suffix == "Condition":
        return {suffix: value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _tag)


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    """Parse a CloudFormation YAML template; short-form intrinsics become their long form."""
    data: dict[str, Any] = yaml.load(path.read_text(), Loader=_CfnLoader)  # a SafeLoader subclass
    return data


# -- deploying --------------------------------------------------------------------------------------------------


async def deploy_stack(
    aws_settings: AwsSettings,
    stack_name: str,
    parameters: Mapping[str, str],
    *,
    template_path: Path = TEMPLATE_PATH,
    timeout_s: float = 60.0,
    poll_s: float = 0.2,
) -> dict[str, str]:
    """Create ``stack_name`` from the template with ``parameters``, wait for CREATE_COMPLETE, return its outputs.

    Against an emulator, the resources and properties it skips are then applied from the template.
    """
    body = await asyncio.to_thread(template_path.read_text)
    async with get_session().create_client("cloudformation", **client_kwargs(aws_settings)) as cfn:
        await cfn.create_stack(
            StackName=stack_name,
            TemplateBody=body,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=["CAPABILITY_IAM"],
            OnFailure="DELETE",
        )
        stack = await _wait(cfn, stack_name, "CREATE_COMPLETE", timeout_s, poll_s)
        if aws_settings.endpoint_url:
            summaries = (await cfn.list_stack_resources(StackName=stack_name))["StackResourceSummaries"]
            physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in summaries if r["LogicalResourceId"]}
            template = await asyncio.to_thread(load_template, template_path)
            await _fill_emulator_gaps(aws_settings, stack_name, template, parameters, physical)
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    log.info("stack %s created with %d outputs", stack_name, len(outputs))
    return outputs


async def deploy_data_plane(
    aws_settings: AwsSettings, stack_name: str, parameters: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Create the template's data-plane resources as ``stack_name``; return the stack outputs.

    ``parameters`` override or add to :data:`DATA_PLANE_PARAMETERS` (e.g. ``{"MaxReceiveCount": "3"}``).
    """
    return await deploy_stack(aws_settings, stack_name, {**DATA_PLANE_PARAMETERS, **(parameters or {})})


async def delete_stack(
    aws_settings: AwsSettings, stack_name: str, *, timeout_s: float = 60.0, poll_s: float = 0.2
) -> None:
    """Delete ``stack_name`` and wait until it is gone (resources with DeletionPolicy Retain stay)."""
    async with get_session().create_client("cloudformation", **client_kwargs(aws_settings)) as cfn:
        await cfn.delete_stack(StackName=stack_name)
        await _wait(cfn, stack_name, "DELETE_COMPLETE", timeout_s, poll_s)


def settings_env(outputs: Mapping[str, str]) -> dict[str, str]:
    """The ``AQUA_PIPELINE_*`` variables that point the service at a stack's resources."""
    env = {ENV_PREFIX + var: outputs[key] for key, var in _OUTPUT_TO_ENV.items() if key in outputs}
    if "EventsTopicArn" in outputs:
        env[ENV_PREFIX + "EVENTS__TARGET"] = "sns"
    return env


async def _wait(cfn: Any, stack_name: str, want: str, timeout_s: float, poll_s: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    status = "UNKNOWN"
    while loop.time() < deadline:
        try:
            stacks = (await cfn.describe_stacks(StackName=stack_name))["Stacks"]
        except ClientError as exc:
            if want == "DELETE_COMPLETE" and "does not exist" in str(exc):  # by name, a deleted stack is gone
                return {"StackStatus": want}
            raise
        stack: dict[str, Any] = stacks[0] if stacks else {"StackStatus": "DELETE_COMPLETE"}
        status = str(stack["StackStatus"])
        if status == want:
            return stack
        if status.endswith(("_COMPLETE", *_FAILED_SUFFIXES)):
            raise StackError(f"stack {stack_name} is {status}: {await _failures(cfn, stack_name)}")
        await asyncio.sleep(poll_s)
    raise StackError(f"stack {stack_name} still {status} after {timeout_s:.0f}s")


async def _failures(cfn: Any, stack_name: str) -> str:
    events = (await cfn.describe_stack_events(StackName=stack_name)).get("StackEvents", [])
    reasons = [
        f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
        for e in events
        if str(e.get("ResourceStatus", "")).endswith("_FAILED")
    ]
    return "; ".join(reasons) or "no resource failure reported"


# -- emulator gaps ----------------------------------------------------------------------------------------------

_NO_VALUE = object()


class _Resolver:
    """Resolves the intrinsics the data-plane resources use, given parameters and physical ids."""

    def __init__(
        self, template: Mapping[str, Any], stack_name: str, parameters: Mapping[str, str], physical: Mapping[str, str]
    ) -> None:
        self.resources: Mapping[str, Any] = template["Resources"]
        self.conditions: Mapping[str, Any] = template.get("Conditions", {})
        self.physical = physical
        self.params = {k: str(v.get("Default", "")) for k, v in template.get("Parameters", {}).items()}
        self.params.update(parameters)
        # Partition, region and account as the emulator sees them, read off any ARN it returned.
        arn = next((v for v in physical.values() if v.startswith("arn:")), "arn:aws::us-east-1:123456789012:")
        _, partition, _, region, account = arn.split(":")[:5]
        self.pseudo = {
            "AWS::StackName": stack_name,
            "AWS::Region": region,
            "AWS::AccountId": account,
            "AWS::Partition": partition,
        }

    def condition(self, name: str) -> bool:
        return bool(self.value(self.conditions[name]))

    def active(self, logical: str) -> bool:
        cond = self.resources[logical].get("Condition")
        return cond is None or self.condition(cond)

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        return self.physical[name]

    def getatt(self, logical: str, attr: str) -> str:
        kind, pid = self.resources[logical]["Type"], self.physical[logical]
        if kind == "AWS::S3::Bucket" and attr == "Arn":
            return f"arn:{self.pseudo['AWS::Partition']}:s3:::{pid}"
        if kind == "AWS::SQS::Queue":
            name = pid.rstrip("/").rsplit("/", 1)[-1]
            if attr == "QueueName":
                return name
            if attr == "Arn":
                p = self.pseudo
                return f"arn:{p['AWS::Partition']}:sqs:{p['AWS::Region']}:{p['AWS::AccountId']}:{name}"
        if kind == "AWS::SNS::Topic" and attr == "TopicName":
            return pid.rsplit(":", 1)[-1]
        raise NotImplementedError(f"Fn::GetAtt {logical}.{attr}")

    def sub(self, text: str) -> str:
        out, rest = [], text
        while "${" in rest:
            head, _, tail = rest.partition("${")
            name, _, rest = tail.partition("}")
            out.append(head)
            out.append(str(self.getatt(*name.split(".", 1)) if "." in name else self.ref(name)))
        return "".join(out) + rest

    def value(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.value(n) for n in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((key, arg),) = node.items()
            if key == "Ref":
                return self.ref(arg)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::GetAtt":
                return self.getatt(arg[0], arg[1])
            if key == "Fn::Sub":
                return self.sub(arg)
            if key == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                return str(self.value(arg[0])) == str(self.value(arg[1]))
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Fn::And":
                return all(self.value(a) for a in arg)
            if key == "Fn::Or":
                return any(self.value(a) for a in arg)
            if key == "Fn::Join":
                return str(arg[0]).join(str(v) for v in self.value(arg[1]))
        return {k: r for k, r in ((k, self.value(v)) for k, v in node.items()) if r is not _NO_VALUE}


async def _fill_emulator_gaps(
    aws_settings: AwsSettings,
    stack_name: str,
    template: Mapping[str, Any],
    parameters: Mapping[str, str],
    physical: Mapping[str, str],
) -> None:
    r = _Resolver(template, stack_name, parameters, physical)
    session = get_session()
    kw = client_kwargs(aws_settings)
    async with AsyncExitStack() as stack:
        s3, sqs, sns, ddb, cw = [
            await stack.enter_async_context(session.create_client(name, **kw))
            for name in ("s3", "sqs", "sns", "dynamodb", "cloudwatch")
        ]
        for logical, resource in template["Resources"].items():
            kind = resource["Type"]
            if kind not in _EMULATOR_GAPS or not r.active(logical):
                continue
            props: dict[str, Any] = r.value(resource.get("Properties", {}))
            wanted = _EMULATOR_GAPS[kind]
            if wanted is not None:
                props = {k: v for k, v in props.items() if k in wanted}
            log.debug("emulator: applying %s (%s) %s", logical, kind, sorted(props))
            if kind == "AWS::S3::Bucket":
                await _bucket_props(s3, physical[logical], props)
            elif kind == "AWS::S3::BucketPolicy":
                await s3.put_bucket_policy(
                    Bucket=props["Bucket"], Policy=orjson.dumps(props["PolicyDocument"]).decode()
                )
            elif kind == "AWS::SQS::QueuePolicy":
                for url in props["Queues"]:
                    policy = orjson.dumps(props["PolicyDocument"]).decode()
                    await sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
            elif kind == "AWS::SNS::Subscription":
                attrs = {"RawMessageDelivery": str(props.get("RawMessageDelivery", False)).lower()}
                await sns.subscribe(
                    TopicArn=props["TopicArn"], Protocol=props["Protocol"], Endpoint=props["Endpoint"], Attributes=attrs
                )
            elif kind == "AWS::DynamoDB::Table":
                await _table_props(ddb, physical[logical], props)
            elif kind == "AWS::CloudWatch::Alarm":
                await cw.put_metric_alarm(**_alarm_args(props))


async def _bucket_props(s3: Any, bucket: str, props: Mapping[str, Any]) -> None:
    if "PublicAccessBlockConfiguration" in props:
        await s3.put_public_access_block(
            Bucket=bucket, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
        )
    if "OwnershipControls" in props:
        await s3.put_bucket_ownership_controls(Bucket=bucket, OwnershipControls=props["OwnershipControls"])
    if "LifecycleConfiguration" in props:
        rules = []
        for rule in props["LifecycleConfiguration"]["Rules"]:
            api: dict[str, Any] = {
                "ID": rule["Id"],
                "Status": rule["Status"],
                "Filter": {"Prefix": rule.get("Prefix", "")},
            }
            if "AbortIncompleteMultipartUpload" in rule:
                days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
                api["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
            if "ExpirationInDays" in rule:
                api["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
            rules.append(api)
        await s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


async def _table_props(ddb: Any, table: str, props: Mapping[str, Any]) -> None:
    ttl = props.get("TimeToLiveSpecification")
    if ttl:
        spec = {"AttributeName": ttl["AttributeName"], "Enabled": str(ttl["Enabled"]).lower() == "true"}
        await ddb.update_time_to_live(TableName=table, TimeToLiveSpecification=spec)
    pitr = props.get("PointInTimeRecoverySpecification")
    if pitr:
        enabled = str(pitr["PointInTimeRecoveryEnabled"]).lower() == "true"
        await ddb.update_continuous_backups(
            TableName=table, PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": enabled}
        )


def _alarm_args(props: Mapping[str, Any]) -> dict[str, Any]:
    """CloudFormation gives numbers from parameters as strings; the PutMetricAlarm API wants numbers."""
    ints = {"Period", "EvaluationPeriods", "DatapointsToAlarm"}
    return {k: int(v) if k in ints else float(v) if k == "Threshold" else v for k, v in props.items()}
