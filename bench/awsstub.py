"""A stand-in for the AWS calls of an accepted callback, for ``python -m bench.callbacks --aws stub``: DynamoDB
``UpdateItem`` and ``TransactWriteItems`` (the fast path, batched under load) and SQS ``SendMessageBatch`` (all
AWS JSON 1.0), answered over keep-alive HTTP with the shapes AWS answers with, after an optional fixed latency per
call (DynamoDB's for both DynamoDB operations).

It decides nothing: every ``UpdateItem`` finds a submitted job (``ReturnValues`` ``ALL_OLD``: the item the
submitter's ``record_submission`` writes, its ``request`` included), every transaction succeeds, and every message
is stored. ``GET /__calls`` also counts the items of the transactions (``TransactWriteItems:items``). What it is for:
measuring the receiver's own CPU and latency at rates moto cannot serve (moto tops out near 40 callbacks/s on
this machine and closes the connection after every response, so each AWS call there also pays a TCP connect).
The receiver still reaches it only through aiobotocore, signing included. Anything else gets a 400.

    python -m bench.awsstub --port 9000 [--ddb-latency-ms 4 --sqs-latency-ms 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
import uuid
import zlib
from typing import Any

import orjson
from aiohttp import web

JSON_10 = "application/x-amz-json-1.0"
REQUEST = {  # a submit body like examples/jobs/accounts.yaml, as record_submission stores it
    "format": "csv",
    "version": "1.0",
    "name": "nightly-accounts",
    "encrypted": "none",
    "useQueryLabels": True,
    "dateTimeUtc": True,
    "nullReplacement": "",
    "queries": [
        {"name": "accounts", "query": "select Id, Name, AccountNumber, Status, Balance, UpdatedDate from Account"},
        {"name": "invoices", "query": "select Id, InvoiceNumber, Amount, Balance, Status, AccountId from Invoice"},
    ],
}


def submitted_item(job_id: dict[str, Any], now: float) -> dict[str, Any]:
    """A job item as the submitter records it (the fast path's ALL_OLD)."""
    return {
        "job_id": job_id,
        "state": {"S": "submitted"},
        "submission_id": {"S": "bench-submission-000000"},
        "job_name": {"S": "nightly-accounts"},
        "submitted_at": {"N": f"{now:.6f}"},
        "updated_at": {"N": f"{now:.6f}"},
        "expires_at": {"N": str(int(now) + 30 * 86400)},
        "callback_count": {"N": "0"},
        "attempts": {"N": "0"},
        "request": {"S": orjson.dumps(REQUEST).decode()},
    }


def create_app(ddb_latency_s: float = 0.0, sqs_latency_s: float = 0.0) -> web.Application:
    """The stub's aiohttp application; ``GET /__calls`` answers how many of each operation it has answered."""
    calls: dict[str, int] = {}
    latency = {"UpdateItem": ddb_latency_s, "TransactWriteItems": ddb_latency_s, "SendMessageBatch": sqs_latency_s}

    async def handle(request: web.Request) -> web.Response:
        op = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        if op not in latency:
            return web.Response(status=400, body=b'{"__type":"UnknownOperationException"}', content_type=JSON_10)
        body = orjson.loads(await request.read())
        calls[op] = calls.get(op, 0) + 1
        if latency[op]:
            await asyncio.sleep(latency[op])
        headers = {"x-amzn-RequestId": str(uuid.uuid4())}
        if op == "UpdateItem":
            out = orjson.dumps({"Attributes": submitted_item(body["Key"]["job_id"], time.time())})
            headers["x-amz-crc32"] = str(zlib.crc32(out))
        elif op == "TransactWriteItems":
            calls["TransactWriteItems:items"] = calls.get("TransactWriteItems:items", 0) + len(body["TransactItems"])
            out = b"{}"
            headers["x-amz-crc32"] = str(zlib.crc32(out))
        else:
            ok = [
                {
                    "Id": e["Id"],
                    "MessageId": str(uuid.uuid4()),
                    "MD5OfMessageBody": hashlib.md5(e["MessageBody"].encode()).hexdigest(),
                    "MD5OfMessageAttributes": "0" * 32,  # a placeholder: botocore does not check it
                }
                for e in body["Entries"]
            ]
            out = orjson.dumps({"Successful": ok, "Failed": []})
        return web.Response(body=out, headers=headers, content_type=JSON_10)

    async def counts(request: web.Request) -> web.Response:
        return web.json_response(calls)

    app = web.Application()
    app.router.add_get("/__calls", counts)
    app.router.add_post("/{tail:.*}", handle)
    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.awsstub``."""
    p = argparse.ArgumentParser(prog="python -m bench.awsstub", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ddb-latency-ms", type=float, default=0.0)
    p.add_argument("--sqs-latency-ms", type=float, default=0.0)
    a = p.parse_args(argv)
    app = create_app(a.ddb_latency_ms / 1000, a.sqs_latency_ms / 1000)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
