"""Small helpers for conditional DynamoDB writes over an injected aiobotocore client: a value codec,
an expression builder, and :class:`DynamoTable`, which translates botocore errors into our tree."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import LedgerError


def encode(value: Any) -> dict[str, Any]:
    """A Python value as a DynamoDB attribute value."""
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, float):
        return {"N": f"{value:.6f}"}
    if isinstance(value, str):
        return {"S": value}
    if value is None:
        return {"NULL": True}
    if isinstance(value, set | frozenset):
        return {"SS": sorted(value)}
    if isinstance(value, Mapping):
        return {"M": {str(k): encode(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"L": [encode(v) for v in value]}
    raise TypeError(f"cannot store {type(value).__name__} in the ledger")


def decode(attr: Mapping[str, Any]) -> Any:
    """A DynamoDB attribute value as a Python value."""
    (kind, value), *_ = attr.items()
    if kind == "N":
        return float(value) if any(c in value for c in ".eE") else int(value)
    if kind in ("SS", "NS"):
        return frozenset(value) if kind == "SS" else frozenset(decode({"N": v}) for v in value)
    if kind == "M":
        return {k: decode(v) for k, v in value.items()}
    if kind == "L":
        return [decode(v) for v in value]
    if kind == "NULL":
        return None
    return value  # S, BOOL, B


class Expr:
    """Collects ``#name`` / ``:value`` placeholders for one DynamoDB expression set. Equal values share one
    placeholder: every value is serialised, signed and parsed once per request, however often it is used."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self._placeholders: dict[str, str] = {}  # repr of the encoded value -> its placeholder

    def n(self, name: str) -> str:
        self.names[f"#{name}"] = name
        return f"#{name}"

    def v(self, value: Any) -> str:
        encoded = encode(value)
        key = repr(encoded)
        ph = self._placeholders.get(key)
        if ph is None:
            ph = self._placeholders[key] = f":v{len(self.values)}"
            self.values[ph] = encoded
        return ph

    def sets(self, fields: Mapping[str, Any]) -> str:
        return ", ".join(f"{self.n(k)} = {self.v(v)}" for k, v in fields.items())

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"ExpressionAttributeNames": self.names}
        if self.values:
            kw["ExpressionAttributeValues"] = self.values
        return kw


class ConditionFailed(Exception):
    """A ConditionExpression did not hold; ``item`` is the current item when DynamoDB returned it."""

    def __init__(self, item: Mapping[str, Any] | None) -> None:
        super().__init__("condition failed")
        self.item = item


CONFLICT_ATTEMPTS = 4
"""Attempts of a write that DynamoDB refuses with ``TransactionConflictException``: it conflicted with a
transaction in flight on the same item, which botocore's retries do not cover."""
CONFLICT_BACKOFF_S = 0.05


class DynamoTable:
    """One table, reached through an injected client; every call's botocore error becomes a LedgerError."""

    def __init__(self, dynamodb_client: Any, table_name: str, *, clock: Callable[[], float] = time.time) -> None:
        self._ddb = dynamodb_client
        self._table = table_name
        self._clock = clock

    @property
    def table_name(self) -> str:
        return self._table

    async def _call(self, op: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                result: dict[str, Any] = await getattr(self._ddb, op)(TableName=self._table, **kw)
                return result
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code == "ConditionalCheckFailedException":
                    raise ConditionFailed(exc.response.get("Item")) from exc
                if code == "TransactionConflictException" and attempt < CONFLICT_ATTEMPTS:
                    # a transaction on the same item was in flight (the callback route's batched counts): it
                    # ends in milliseconds, and botocore does not retry this code itself
                    await asyncio.sleep(random.uniform(0.5, 1.0) * CONFLICT_BACKOFF_S * attempt)
                    continue
                raise self._failed(op, exc) from exc
            except BotoCoreError as exc:
                raise self._failed(op, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _scan_items(self, filter_expr: str, e: Expr) -> list[dict[str, Any]]:
        """Every item matching ``filter_expr`` (a full, paginated Scan), as DynamoDB returned them."""
        items: list[dict[str, Any]] = []
        kw: dict[str, Any] = {"FilterExpression": filter_expr, **e.kwargs()}
        while True:
            resp = await self._call("scan", **kw)
            items.extend(resp.get("Items", []))
            if not resp.get("LastEvaluatedKey"):
                return items
            kw["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def _failed(self, op: str, exc: Exception) -> LedgerError:
        return LedgerError(f"dynamodb {op} on {self._table} failed: {exc}")

    async def _update(
        self,
        key: Mapping[str, Any],
        e: Expr,
        update: str,
        *,
        condition: str | None = None,
        returns: str = "NONE",
        returns_on_failure: bool = False,
    ) -> dict[str, Any]:
        """One UpdateItem with ``e``'s placeholders; raises :class:`ConditionFailed` when ``condition`` fails."""
        kw = self._update_params(key, e, update, condition=condition)
        kw["ReturnValues"] = returns
        if returns_on_failure:
            kw["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        return await self._call("update_item", **kw)

    async def _update_if(self, key: Mapping[str, Any], e: Expr, update: str, *, condition: str | None) -> bool:
        """One conditional UpdateItem; False (nothing written) when ``condition`` does not hold."""
        try:
            await self._update(key, e, update, condition=condition)
        except ConditionFailed:
            return False
        return True

    @staticmethod
    def _update_params(key: Mapping[str, Any], e: Expr, update: str, *, condition: str | None = None) -> dict[str, Any]:
        """The parameters an UpdateItem and a TransactWriteItems ``Update`` entry share (no table name)."""
        kw: dict[str, Any] = {"Key": dict(key), "UpdateExpression": update, **e.kwargs()}
        if condition is not None:
            kw["ConditionExpression"] = condition
        return kw

    async def _transact_updates(self, updates: list[dict[str, Any]], request_token: str) -> list[str] | None:
        """One TransactWriteItems of ``updates`` (from :meth:`_update_params`), all or nothing.

        None when every update was written. When DynamoDB cancelled the transaction, nothing was written and the
        answer is each update's cancellation code, in order: ``ConditionalCheckFailed`` (its condition did not
        hold), ``None`` (it was fine; another one cancelled the transaction), ``TransactionConflict`` (an item was
        being written at the same time), or another code. ``request_token`` makes botocore's own retries of the
        call idempotent (DynamoDB's ``ClientRequestToken``). Any other failure raises :class:`LedgerError`.
        """
        items = [{"Update": {"TableName": self._table, **u}} for u in updates]
        try:
            await self._ddb.transact_write_items(TransactItems=items, ClientRequestToken=request_token)
            return None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "TransactionCanceledException":
                raise self._failed("transact_write_items", exc) from exc
            reasons = exc.response.get("CancellationReasons") or []
            return [str((reasons[i] if i < len(reasons) else {}).get("Code", "None")) for i in range(len(updates))]
        except BotoCoreError as exc:
            raise self._failed("transact_write_items", exc) from exc
