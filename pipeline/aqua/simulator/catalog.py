"""The simulated Zuora data model: objects, their fields (with a generator kind each) and their joins.

Kinds (read by ``data.py``): ``id`` (the row's own id), ``ref:<Object>`` (another object's id), ``company``,
``first``, ``last``, ``email``, ``address``, ``city``, ``text``, ``code:<PREFIX>`` (a numbered code such as
``A00000001``), ``money``, ``int:<lo>:<hi>``, ``bool``, ``enum:<a>|<b>``, ``currency``, ``date``, ``created``,
``updated``. A trailing ``?`` makes the field null for about one row in eight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_DATES = {"CreatedDate": "created", "UpdatedDate": "updated"}

OBJECTS: dict[str, dict[str, str]] = {
    "AccountingPeriod": {  # the object of the API reference's own submit example (and without deleted rows)
        "Id": "id",
        "Name": "code:AP",
        "StartDate": "date",
        "EndDate": "date",
        "FiscalYear": "int:2015:2027",
        "Status": "enum:Open|Open|Closed|PendingClose",
        "Notes": "text?",
        **_DATES,
    },
    "Account": {
        "Id": "id",
        "AccountNumber": "code:A",
        "Name": "company",
        "Balance": "money",
        "CreditBalance": "money",
        "Status": "enum:Active|Active|Active|Draft|Canceled",
        "Currency": "currency",
        "BillCycleDay": "int:1:28",
        "AutoPay": "bool",
        "PaymentTerm": "enum:Due Upon Receipt|Net 30|Net 60",
        "Notes": "text?",
        "ParentId": "ref:Account?",
        **_DATES,
    },
    "Contact": {
        "Id": "id",
        "AccountId": "ref:Account",
        "FirstName": "first",
        "LastName": "last",
        "WorkEmail": "email?",
        "Address1": "address?",
        "City": "city",
        "Country": "enum:United States|Germany|France|Japan|Brazil|Canada",
        "PostalCode": "int:10000:99999",
        **_DATES,
    },
    "Invoice": {
        "Id": "id",
        "AccountId": "ref:Account",
        "InvoiceNumber": "code:INV",
        "InvoiceDate": "date",
        "DueDate": "date",
        "Amount": "money",
        "Balance": "money",
        "Status": "enum:Posted|Posted|Posted|Draft|Canceled",
        "Comments": "text?",
        **_DATES,
    },
    "InvoiceItem": {
        "Id": "id",
        "InvoiceId": "ref:Invoice",
        "AccountId": "ref:Account",
        "ChargeName": "enum:Monthly Fee|Setup Fee|Usage Overage|Support, Premium",
        "ChargeAmount": "money",
        "Quantity": "int:1:100",
        "ServiceStartDate": "date",
        "ServiceEndDate": "date",
        "UOM": "enum:Each|GB|Hour|Seat",
        **_DATES,
    },
    "Payment": {
        "Id": "id",
        "AccountId": "ref:Account",
        "PaymentNumber": "code:P",
        "Amount": "money",
        "EffectiveDate": "date",
        "Status": "enum:Processed|Processed|Processed|Error|Voided",
        "Type": "enum:Electronic|External",
        "Comment": "text?",
        **_DATES,
    },
    "Product": {
        "Id": "id",
        "Name": "company",
        "SKU": "code:SKU-",
        "Description": "text?",
        "Category": "enum:Base Products|Add On Services|Miscellaneous Products",
        "EffectiveStartDate": "date",
        "EffectiveEndDate": "date",
        **_DATES,
    },
    "RatePlanCharge": {
        "Id": "id",
        "SubscriptionId": "ref:Subscription",
        "ProductId": "ref:Product",
        "Name": "enum:Monthly Fee|Setup Fee|Usage Overage|Support, Premium",
        "ChargeModel": "enum:Flat Fee Pricing|Per Unit Pricing|Tiered Pricing|Volume Pricing",
        "ChargeType": "enum:Recurring|OneTime|Usage",
        "BillingPeriod": "enum:Month|Quarter|Annual",
        "Quantity": "int:1:500?",
        "MRR": "money",
        "TCV": "money",
        "EffectiveStartDate": "date",
        "EffectiveEndDate": "date?",
        **_DATES,
    },
    "Subscription": {
        "Id": "id",
        "AccountId": "ref:Account",
        "Name": "code:A-S",
        "Status": "enum:Active|Active|Active|Cancelled|Expired|Suspended",
        "TermType": "enum:TERMED|EVERGREEN",
        "InitialTerm": "int:1:36",
        "AutoRenew": "bool",
        "Version": "int:1:9",
        "ContractEffectiveDate": "date",
        "SubscriptionStartDate": "date",
        "SubscriptionEndDate": "date?",
        "Notes": "text?",
        **_DATES,
    },
}
"""Object name -> field name -> generator kind."""

JOINS: dict[str, dict[str, str]] = {
    "AccountingPeriod": {},
    "Account": {"BillToContact": "Contact", "SoldToContact": "Contact", "ParentAccount": "Account"},
    "Contact": {"Account": "Account"},
    "Invoice": {"Account": "Account", "BillToContact": "Contact"},
    "InvoiceItem": {"Invoice": "Invoice", "Account": "Account"},
    "Payment": {"Account": "Account"},
    "Product": {},
    "RatePlanCharge": {"Subscription": "Subscription", "Product": "Product", "Account": "Account"},
    "Subscription": {"Account": "Account"},
}
"""Object name -> join alias usable as ``Alias.Field`` in a select list -> joined object."""


def field_names(catalog: Mapping[str, Mapping[str, str]] = OBJECTS) -> dict[str, list[str]]:
    """Object -> field names, the view :mod:`pipeline.aqua.validation` checks queries against."""
    return {obj: list(fields) for obj, fields in catalog.items()}


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def label(name: str) -> str:
    """Zuora's UI label for a name: ``AccountNumber`` -> ``Account Number``, ``Id`` -> ``ID``."""
    if name == "Id":
        return "ID"
    if name.endswith("Id") and len(name) > 2:
        return _CAMEL.sub(" ", name[:-2]) + " ID"
    return _CAMEL.sub(" ", name)
