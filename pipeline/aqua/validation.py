"""Validation of an AQuA submit body (REFERENCE.md §3, §10, §11): pure, no I/O.

Shared by the simulator (which answers with the first error) and client-side checks before a submit.
Every error is ``(errorCode, message)``; codes are AQuA's where one exists (§11.1). Request fields outside
the documented limits that have no AQuA code of their own (name length, version, format, query type, offset,
partner without project) use :data:`INVALID_REQUEST` (``"90000"``, a simulator choice, docs/simulator.md).

The ZOQL check understands ``select <fields|*> from <Object> [where <conditions>]`` with ``Alias.Field``
joins; conditions are ``field op value``, ``field is [not] null`` and ``field [not] in (...)`` joined by
``and``/``or`` with parentheses. Objects and fields are checked against a catalog (default: the simulator's);
custom fields (``__c``) are always accepted.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.aqua.models import MAX_EXPORT_ZOQL, MAX_NAME, MAX_NOTIFY_URL, MAX_QUERIES

INVALID_REQUEST = "90000"
SYNTAX_ERROR = "90005"
SYNTAX_MESSAGE = "There is a syntax error in one of the queries in the AQuA input"
DELETED_UNSUPPORTED_MESSAGE = (
    "Objects included in the queries do not support the querying of deleted records. "
    "Remove Deleted section in the JSON request and retry the request"
)
VERSIONS = ("1.0", "1.1", "1.2")
FORMATS = ("csv", "zip", "gzip")
"""The formats AQuA takes (REFERENCE.md §3.1)."""
SIMULATOR_FORMATS = (*FORMATS, "tsv")
"""The simulator's: AQuA's and its own extension, TSV (docs/simulator.md)."""
QUERY_TYPES = ("zoql", "zoqlexport")

DOES_NOT_SUPPORT_DELETED = frozenset(
    {
        "AccountingCode",
        "AccountingPeriod",
        "BookingTransaction",
        "CalloutHistory",
        "ContactSnapshot",
        "DiscountAppliedMetrics",
        "EmailHistory",
        "HpmCaptchaValidationResult",
        "PaymentGatewayReconciliationEventLog",
        "PaymentMethodTransactionLog",
        "PaymentReconciliationJob",
        "PaymentReconciliationLog",
        "PaymentTransactionLog",
        "ProcessedUsage",
        "RefundTransactionLog",
        "SmartPreventionAudit",
        "UpdaterBatch",
        "UpdaterDetail",
    }
)
"""tap-zuora's list plus the docs' AccountingCode (REFERENCE.md §3.3): ``deleted`` on these -> 90017."""

Catalog = Mapping[str, Collection[str]]
Joins = Mapping[str, Mapping[str, str]]


class ZoqlError(ValueError):
    """A query the simulator cannot run; ``code`` and ``message`` go into the AQuA error body."""

    def __init__(self, message: str, code: str = SYNTAX_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Column:
    """One selected column: ``source`` is the joined object (None for the FROM object)."""

    alias: str | None
    source: str
    field: str


@dataclass(frozen=True)
class ParsedQuery:
    """The parts of a ZOQL query the simulator needs."""

    obj: str
    columns: tuple[Column, ...]
    where: str | None


_QUERY_RE = re.compile(
    r"^\s*select\s+(?P<fields>.+?)\s+from\s+(?P<obj>\w+)(?:\s+where\s+(?P<where>.+?))?\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_IDENT = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?$")
_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>|\(|\)|,)"
    r"|(?P<word>[A-Za-z_][\w.]*))",
    re.DOTALL,
)
_KEYWORDS = {"and", "or", "not", "is", "null", "in", "like", "true", "false"}
_INCREMENTAL_FMT = "%Y-%m-%d %H:%M:%S"


def _default_catalog() -> tuple[Catalog, Joins]:
    from pipeline.aqua.simulator.catalog import JOINS, OBJECTS  # late: the simulator package imports us

    return OBJECTS, JOINS


def _lookup(name: str, names: Collection[str]) -> str | None:
    if name in names:
        return name
    low = name.lower()
    for candidate in names:
        if candidate.lower() == low:
            return candidate
    return None


def parse_zoql(text: str, catalog: Catalog | None = None, joins: Joins | None = None) -> ParsedQuery:
    """Parse and check a ZOQL query; raises :class:`ZoqlError`. ``catalog=None`` uses the simulator's."""
    if catalog is None:
        catalog, default_joins = _default_catalog()
        joins = default_joins if joins is None else joins
    joins = joins or {}
    m = _QUERY_RE.match(text)
    if not m:
        raise ZoqlError(SYNTAX_MESSAGE)
    obj = _lookup(m["obj"], catalog)
    if obj is None:
        raise ZoqlError(f"{SYNTAX_MESSAGE}: Error.zoql.noSuchObject: {m['obj']}")
    fields = catalog[obj]
    obj_joins = joins.get(obj, {})
    columns: list[Column] = []
    raw_fields = [f.strip() for f in m["fields"].split(",")]
    if raw_fields == ["*"]:
        columns = [Column(None, obj, f) for f in fields]
    else:
        for raw in raw_fields:
            columns.append(_column(raw, obj, fields, obj_joins, catalog))
    where = m["where"]
    if where is not None:
        _check_where(where, obj, fields, obj_joins, catalog)
    return ParsedQuery(obj, tuple(columns), where)


def _column(raw: str, obj: str, fields: Collection[str], obj_joins: Mapping[str, str], catalog: Catalog) -> Column:
    if not _IDENT.match(raw):
        raise ZoqlError(SYNTAX_MESSAGE)
    if "." in raw:
        prefix, name = raw.split(".", 1)
        if prefix.lower() == obj.lower():
            return _column(name, obj, fields, obj_joins, catalog)
        alias = _lookup(prefix, obj_joins)
        if alias is None:
            raise ZoqlError(f"{SYNTAX_MESSAGE}: Error.zoql.noSuchFieldId: {raw} on {obj}")
        target = obj_joins[alias]
        found = _lookup(name, catalog.get(target, ()))
        if found is None and not name.endswith("__c"):
            raise ZoqlError(f"{SYNTAX_MESSAGE}: Error.zoql.noSuchFieldId: {raw}")
        return Column(alias, target, found or name)
    found = _lookup(raw, fields)
    if found is None and not raw.endswith("__c"):
        raise ZoqlError(f"{SYNTAX_MESSAGE}: Error.zoql.noSuchFieldId: {obj}.{raw}")
    return Column(None, obj, found or raw)


def _tokens(where: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    stripped = where.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if not m or m.end() == pos:
            raise ZoqlError(SYNTAX_MESSAGE)
        kind = m.lastgroup or ""
        value = m[kind]
        if kind == "word" and value.lower() in _KEYWORDS:
            kind, value = "kw", value.lower()
        out.append((kind, value))
        pos = m.end()
    return out


def _check_where(where: str, obj: str, fields: Collection[str], joins: Mapping[str, str], catalog: Catalog) -> None:
    """Recursive-descent check of ``cond ((and|or) cond)*`` with parentheses."""
    toks = _tokens(where)
    i = 0

    def peek() -> tuple[str, str]:
        return toks[i] if i < len(toks) else ("end", "")

    def take() -> tuple[str, str]:
        nonlocal i
        tok = peek()
        if tok[0] == "end":
            raise ZoqlError(SYNTAX_MESSAGE)
        i += 1
        return tok

    def value() -> None:
        kind, v = take()
        if kind not in ("str", "num") and not (kind == "kw" and v in ("true", "false", "null")):
            raise ZoqlError(SYNTAX_MESSAGE)

    def condition() -> None:
        if peek() == ("op", "("):
            take()
            expr()
            if take() != ("op", ")"):
                raise ZoqlError(SYNTAX_MESSAGE)
            return
        kind, name = take()
        if kind != "word":
            raise ZoqlError(SYNTAX_MESSAGE)
        _column(name, obj, fields, joins, catalog)
        kind, op = take()
        if kind == "op" and op in ("=", "!=", "<>", "<", "<=", ">", ">="):
            value()
        elif (kind, op) == ("kw", "like"):
            if take()[0] != "str":
                raise ZoqlError(SYNTAX_MESSAGE)
        elif (kind, op) == ("kw", "is"):
            if peek() == ("kw", "not"):
                take()
            if take() != ("kw", "null"):
                raise ZoqlError(SYNTAX_MESSAGE)
        elif (kind, op) in (("kw", "in"), ("kw", "not")):
            if op == "not" and take() != ("kw", "in"):
                raise ZoqlError(SYNTAX_MESSAGE)
            if take() != ("op", "("):
                raise ZoqlError(SYNTAX_MESSAGE)
            value()
            while peek() == ("op", ","):
                take()
                value()
            if take() != ("op", ")"):
                raise ZoqlError(SYNTAX_MESSAGE)
        else:
            raise ZoqlError(SYNTAX_MESSAGE)

    def expr() -> None:
        condition()
        while peek() in (("kw", "and"), ("kw", "or")):
            take()
            condition()

    expr()
    if peek()[0] != "end":
        raise ZoqlError(SYNTAX_MESSAGE)


def as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


_NO_DELETED_LOWER = frozenset(o.lower() for o in DOES_NOT_SUPPORT_DELETED)


def normalise_version(v: Any) -> str | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return f"{float(v):.1f}"
    if isinstance(v, str):
        return v.strip()
    return None


def is_stateful(body: Mapping[str, Any]) -> bool:
    """Stateful when version is 1.1/1.2 and both partner and project are set (REFERENCE.md §3.4)."""
    return (
        normalise_version(body.get("version", "1.0")) in ("1.1", "1.2")
        and bool(body.get("partner"))
        and bool(body.get("project"))
    )


def validate_submit(
    body: Mapping[str, Any],
    *,
    catalog: Catalog | None = None,
    joins: Joins | None = None,
    check_fields: bool = True,
    formats: tuple[str, ...] = FORMATS,
) -> list[tuple[str, str]]:
    """Every problem with a submit body, as ``(errorCode, message)``; empty when AQuA would accept it.

    ``check_fields=False`` skips the object/field existence check (for real tenants with other objects);
    ``formats``: the simulator passes :data:`SIMULATOR_FORMATS`.
    """
    errors: list[tuple[str, str]] = []
    if not isinstance(body, Mapping):
        return [(INVALID_REQUEST, "The request body must be a JSON object")]
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME):
        errors.append((INVALID_REQUEST, f"name must be a string of at most {MAX_NAME} characters"))
    version = normalise_version(body.get("version", "1.0"))
    if version not in VERSIONS:
        errors.append((INVALID_REQUEST, f"version must be one of {', '.join(VERSIONS)}"))
    fmt = body.get("format", "csv")
    if not isinstance(fmt, str) or fmt.lower() not in formats:
        errors.append((INVALID_REQUEST, f"format must be one of {', '.join(formats)}"))
    source = body.get("sourceData")
    if source is not None and (not isinstance(source, str) or source.upper() != "LIVE"):
        errors.append((INVALID_REQUEST, "sourceData must be LIVE"))
    encrypted = body.get("encrypted")
    if encrypted is not None and (not isinstance(encrypted, str) or encrypted.lower() not in ("none", "pgp")):
        errors.append((INVALID_REQUEST, "encrypted must be none or pgp"))
    # partner without project (or the reverse) is no error: AQuA runs the job stateless (REFERENCE.md §3.4)
    stateful = is_stateful(body)
    notify = body.get("notifyUrl")
    if notify is not None and (not isinstance(notify, str) or len(notify) > MAX_NOTIFY_URL):
        errors.append(("90014", "The notifyUrl must be shorter than 5000 characters"))
    inc = body.get("incrementalTime")
    if inc is not None:
        if not stateful:
            errors.append(("90015", "incrementalTime is only supported for stateful AQuA"))
        else:
            try:
                datetime.strptime(str(inc), _INCREMENTAL_FMT)
            except ValueError:
                errors.append(("90015", "Invalid incremental time: expected yyyy-MM-dd HH:mm:ss"))
    offset = body.get("offset")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= 3600):
        errors.append((INVALID_REQUEST, "offset must be an integer between 0 and 3600"))
    queries = body.get("queries")
    if queries is None or queries == []:
        if not stateful:
            errors.append(("90016", "There are no queries in the AQuA input"))
        return errors
    if not isinstance(queries, list):
        return [*errors, (INVALID_REQUEST, "queries must be a list")]
    if len(queries) > MAX_QUERIES:
        errors.append(("90004", f"The number of queries exceeds the limit of {MAX_QUERIES}"))
        return errors
    seen: set[str] = set()
    for q in queries:
        errors.extend(_validate_query(q, stateful, seen, catalog, joins, check_fields))
    return errors


def _validate_query(
    q: Any, stateful: bool, seen: set[str], catalog: Catalog | None, joins: Joins | None, check_fields: bool
) -> list[tuple[str, str]]:
    if not isinstance(q, Mapping) or not isinstance(q.get("query"), str) or not q.get("query", "").strip():
        return [(SYNTAX_ERROR, SYNTAX_MESSAGE)]
    errors: list[tuple[str, str]] = []
    qname = q.get("name")
    if not isinstance(qname, str) or not qname:
        errors.append((INVALID_REQUEST, "every query needs a name"))
    elif qname in seen:
        errors.append((INVALID_REQUEST, f"duplicate query name {qname!r}"))
    else:
        seen.add(qname)
    qtype = q.get("type", "zoqlexport")
    if not isinstance(qtype, str) or qtype.lower() not in QUERY_TYPES:
        errors.append((INVALID_REQUEST, "query type must be zoql or zoqlexport"))
    text: str = q["query"]
    if len(text) > MAX_EXPORT_ZOQL:
        return [*errors, (SYNTAX_ERROR, f"{SYNTAX_MESSAGE}: the query exceeds {MAX_EXPORT_ZOQL} characters")]
    m = _QUERY_RE.match(text)
    deleted = q.get("deleted")
    if deleted is not None:
        if not isinstance(deleted, Mapping) or not isinstance(deleted.get("column"), str) or not deleted["column"]:
            errors.append((INVALID_REQUEST, "deleted needs a column name"))
        elif deleted.get("format", "Boolean") not in ("Boolean", "Numeric"):
            errors.append((INVALID_REQUEST, "deleted.format must be Boolean or Numeric"))
        if m and m["obj"].lower() in _NO_DELETED_LOWER:  # object names are case-insensitive in ZOQL
            errors.append(("90017", DELETED_UNSUPPORTED_MESSAGE))
        elif not stateful and not (isinstance(deleted, Mapping) and as_bool(deleted.get("forceExport"))):
            errors.append(("90012", "Stateless AQuA does not support deleted columns; set forceExport"))
    try:
        if check_fields:
            parse_zoql(text, catalog, joins)
        else:
            _syntax_only(text)
    except ZoqlError as exc:
        errors.append((exc.code, exc.message))
    return errors


def _syntax_only(text: str) -> None:
    m = _QUERY_RE.match(text)
    if not m:
        raise ZoqlError(SYNTAX_MESSAGE)
    for raw in m["fields"].split(","):
        if raw.strip() != "*" and not _IDENT.match(raw.strip()):
            raise ZoqlError(SYNTAX_MESSAGE)
    if m["where"] is not None:
        _tokens(m["where"])
