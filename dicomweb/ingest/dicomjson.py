"""The DICOM JSON Model (PS3.18 F.2) of a pydicom data set, as the index stores it.

The document is the one pydicom's `Dataset.to_json_dict` gives (without a bulk data handler: every binary value
inline) and `json.dumps(..., separators=(",", ":"), ensure_ascii=False)` writes, element for element and byte
for byte; it is built here from the elements' values directly, without the per-element method calls, copies and
checks that make pydicom's path slow, and written by msgspec.

What "the same" takes, rule by rule (PS3.18 F.2.3, F.2.5, F.2.6, F.2.7 as pydicom implements them):

- each element is `{"vr": VR}`, then `"Value"` (a list), `"InlineBinary"` (base64) or nothing when empty;
- binary VRs (OB OD OF OL OV OW UN and the ambiguous `OB or OW`, `US or OW`, `US or SS or OW`) are InlineBinary;
- SQ always has a `Value`, empty or not, each item a document of its own (in the item's element order);
- PN values are `{"Alphabetic", "Ideographic", "Phonetic"}` objects with as many groups as the name has;
- AT values are 8 hexadecimal digits, upper case;
- IS SL SS SV UL US UV (and an unresolved `US or SS`) become integers, DS FD FL floats, an empty one null;
- a value pydicom cannot convert (a DS that is not a number, a PN that is not a name) raises as pydicom's does.

Elements are converted from their raw form by pydicom (`Dataset[tag]`), as before: character sets, padding,
value multiplicity, ambiguous VRs and the validation warnings stay pydicom's.

Writing: msgspec's output equals `json.dumps`'s except for floats outside [1e-4, 1e16) (exponent notation:
`1e-05` against `0.00001`) and non-finite ones (`NaN` against `null`), and for values `json.dumps` does not
accept; a document holding any of these is written by `json.dumps` itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

import msgspec
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, FLOAT_VR, INT_VR, VR

_BINARY = frozenset((BYTES_VR | AMBIGUOUS_VR) - {VR.US_SS})
_INTEGER = frozenset((INT_VR - {VR.AT}) | {VR.US_SS})
_FLOAT = frozenset(FLOAT_VR)
_SQ, _PN, _AT = VR.SQ, VR.PN, VR.AT
_SMALLEST, _LARGEST = 1e-4, 1e16
"""Floats msgspec writes as Python's `repr` does: zero and magnitudes in [1e-4, 1e16)."""


class _Unlike(Exception):
    """A value msgspec would not write as `json.dumps` does."""


def from_elements(elements: Iterable[DataElement]) -> dict[str, Any]:
    """The DICOM JSON document of these elements of a data set (converted already, as `Dataset[tag]` gives
    them), in that order: what pydicom's `to_json_dict` gives, without a bulk data handler, for a data set
    holding just them. Raises what pydicom raises for a value it cannot represent."""
    return {f"{elem.tag:08X}": _element(elem) for elem in elements}


def dumps(document: dict[str, Any]) -> str:
    """`document` as `json.dumps(document, separators=(",", ":"), ensure_ascii=False)` writes it, byte for byte;
    raises what that raises."""
    try:
        _check(document)
        return _ENCODER.encode(document).decode("utf-8")
    except (_Unlike, TypeError, ValueError, OverflowError):  # ValueError: UnicodeEncodeError, a lone surrogate
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def _dataset(ds: Dataset, tags: Iterable[BaseTag]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in tags:
        out[f"{tag:08X}"] = _element(ds[tag])
    return out


def _element(elem: DataElement) -> dict[str, Any]:
    vr = elem.VR
    value = elem.value
    json_element: dict[str, Any] = {"vr": vr}
    if vr in _BINARY:
        if not _is_empty(elem, value):
            json_element["InlineBinary"] = base64.b64encode(value).decode("utf-8")
    elif vr == _SQ:
        json_element["Value"] = [_dataset(item, item.keys()) for item in value]
    elif vr == _PN:
        vm = elem.VM
        if vm:
            names = []
            for name in value if vm > 1 else [value]:
                components = name.components
                comps = {"Alphabetic": components[0]}
                if len(components) > 1:
                    comps["Ideographic"] = components[1]
                if len(components) > 2:
                    comps["Phonetic"] = components[2]
                names.append(comps)
            json_element["Value"] = names
    elif vr == _AT:
        vm = elem.VM
        if vm:
            json_element["Value"] = [format(v, "08X") for v in ([value] if vm == 1 else value)]
    else:
        values = _values(elem, value)
        if values is not None:
            if vr in _INTEGER:
                values = [int(v) if v is not None else empty_value_for_VR(vr) for v in values]
            elif vr in _FLOAT:
                values = [float(v) if v is not None else empty_value_for_VR(vr) for v in values]
            else:
                values = list(values)
            json_element["Value"] = values
    return json_element


def _is_empty(elem: DataElement, value: Any) -> bool:
    if isinstance(value, bytes):
        return not value
    return elem.VM == 0


def _values(elem: DataElement, value: Any) -> Any:
    """The element's values as pydicom's `to_json_dict` lists them (the value itself when its VM is above 1),
    or None when it is empty."""
    if isinstance(value, str | bytes):
        return [value] if value else None
    if isinstance(value, int | float):  # pydicom's IS and DSfloat too: one value, as pydicom counts it
        return [value]
    if type(value) is MultiValue:
        return value if len(value) > 1 else ([value] if value else None)
    vm = elem.VM
    if vm == 0:
        return None
    return value if vm > 1 else [value]


# ---------------------------------------------------------------------------------------------- writing


def _check(node: Any) -> None:
    """Raise `_Unlike` where msgspec and `json.dumps` would write `node` differently: a float outside the range
    both write alike, or a value of a type `json.dumps` refuses or writes otherwise (bytes, which msgspec would
    write as base64)."""
    for element in node.values():
        if "Value" not in element:
            continue
        vr = element["vr"]
        values = element["Value"]
        if vr == _SQ:
            for item in values:
                _check(item)
        elif vr in _FLOAT:
            for v in values:
                if v is not None and not (_SMALLEST <= abs(v) < _LARGEST) and v != 0.0:
                    raise _Unlike
        elif vr in _INTEGER or vr == _PN:
            continue
        else:
            for v in values:
                if not isinstance(v, str) and v is not None:
                    raise _Unlike


def _plain(obj: Any) -> Any:
    """msgspec's hook for types it does not write itself: str subclasses (pydicom's UID) as `json.dumps` writes
    them; anything else is refused, so that `json.dumps` decides."""
    if isinstance(obj, str):
        return str.__str__(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_ENCODER = msgspec.json.Encoder(enc_hook=_plain)
