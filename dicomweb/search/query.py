"""QIDO-RS query parameters (PS3.18 8.3.4, 10.6.1) parsed into a `Query` value.

A pure codec (house style 1): it takes the decoded `(name, value)` pairs of the request and the UIDs of its
path and returns a frozen `Query`, or raises `InvalidParameter` (400). Matching follows PS3.4 C.2.2.2:
single value, UID list, universal (an empty value: a return key), wild card (`*`, `?`) and range (`A-B`, `A-`,
`-B` for DA, TM, DT). Which keys the index matches, and how, is decided here; the SQL builder only translates.

- Keys named by keyword (`PatientName`) or tag (`00100010`); a name that is neither, a malformed value, a
  sequence or binary attribute, a repeated non-UID key: `InvalidParameter`.
- Keys with an index column (`INDEXED`) support every matching kind their VR allows. Person names match
  case-insensitively (C.2.2.2.1 allows it for PN) and per component group (a value without `=` matches any
  of the alphabetic, ideographic and phonetic groups; with `=`, each given group its own); so, as a
  deliberate convenience for viewers' search boxes, do Study and Series Description. Everything else is
  case-sensitive. `fuzzymatching=true` also lets a person name value match the start of any name component
  (`jo` matches `Doe^John`).
- Keys of a level below the resource match through its children: `/studies?Modality=MR` finds studies with
  an MR series (as ModalitiesInStudy does).
- Other keys of the stored study / series attributes (or, inside a named study or series, the instance
  metadata) support single value matching by JSON containment; anything else is ignored and reported in
  `Query.unsupported`, for a `Warning: 299` header (PS3.18 8.3.4.1 lets a server ignore keys it cannot match).
- `limit` is at most `MAX_LIMIT` (1000), which is also the default: larger requests are cut to it and the
  response carries a Warning that more results exist (PS3.18 8.3.4.4).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from enum import Enum, IntEnum

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from dicomweb.errors import InvalidParameter
from dicomweb.search.levels import SERIES_TAGS, STUDY_TAGS
from dicomweb.uids import UID, is_valid_uid

MAX_LIMIT = 1000
"""The most results one response holds, and the number returned when `limit` is absent (or 0)."""
MAX_OFFSET = 2**31 - 1
MAX_VALUE_CHARS = 1024
MAX_LIST_VALUES = 1000


class Level(IntEnum):
    """Query/Retrieve levels of the index, top down (PS3.4 C.6.2)."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


class Match(Enum):
    """Kinds of attribute matching (PS3.4 C.2.2.2)."""

    UNIVERSAL = "universal"  # C.2.2.2.3: zero-length value, the attribute is only returned
    SINGLE = "single"  # C.2.2.2.1
    LIST = "list"  # C.2.2.2.2: UID list (also a list of code strings: any of them)
    WILDCARD = "wildcard"  # C.2.2.2.4
    RANGE = "range"  # C.2.2.2.5: values are (low, high), '' for an open end


@dataclass(frozen=True, slots=True)
class Filter:
    """One matching (or return) key. `indexed` is False for keys matched by JSON containment on the stored
    attributes of `level` (single value only)."""

    tag: str
    keyword: str
    vr: str
    level: Level
    match: Match
    values: tuple[str, ...] = ()
    indexed: bool = True


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed QIDO-RS request: the resource level, the scope named by its path, and its parameters."""

    level: Level
    study_uid: UID | None = None
    series_uid: UID | None = None
    filters: tuple[Filter, ...] = ()
    include: frozenset[str] = frozenset()
    include_all: bool = False
    limit: int = MAX_LIMIT
    limit_requested: int | None = None
    offset: int = 0
    fuzzy: bool = False
    unsupported: tuple[str, ...] = field(default=())

    @property
    def return_tags(self) -> frozenset[str]:
        """Tags asked for by includefield or named as keys (matched keys are returned, PS3.4 C.2.2.1)."""
        return self.include | {f.tag for f in self.filters}


def tag_of(keyword: str) -> str:
    """The 8-hex-digit tag of a dictionary keyword."""
    value = tag_for_keyword(keyword)
    assert value is not None, keyword
    return f"{value:08X}"


def _tags(*keywords: str) -> tuple[str, ...]:
    return tuple(tag_of(k) for k in keywords)


# Keys with an index column (migrations/0001_index.sql), by the level whose rows they filter.
_INDEXED_KEYWORDS: dict[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
    ),
    Level.SERIES: (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
        "SeriesDate",
        "SeriesTime",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    ),
    Level.INSTANCE: (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
    ),
}
INDEXED: dict[str, Level] = {tag_of(k): level for level, kws in _INDEXED_KEYWORDS.items() for k in kws}

# Computed by the server from the index (PS3.18 10.6.3.3): returned, never matched.
STUDY_COMPUTED = _tags("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_COMPUTED = _tags("NumberOfSeriesRelatedInstances")
ANY_LEVEL_COMPUTED = _tags("RetrieveURL", "InstanceAvailability")
_NOT_MATCHABLE = frozenset(STUDY_COMPUTED + SERIES_COMPUTED + ANY_LEVEL_COMPUTED)

# Code strings matched as a list of alternatives when given as `CT\MR` or `CT,MR` (OHIF sends the latter).
_CS_LISTS = frozenset(_tags("ModalitiesInStudy", "Modality", "PatientSex", "BodyPartExamined"))
_UID_SEPARATORS = re.compile(r"[\\,]")

INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_KEYWORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_TM = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9]|60)?)?(\.[0-9]{1,6})?$")
_DT = re.compile(r"^[0-9]{4}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?)?)?)?([+-][0-9]{4})?$")
_SCOPING_KEYS = frozenset(_tags("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
_RESERVED = frozenset({"accept", "charset"})  # read by the route (PS3.18 8.3.3), not query keys


def level_of(tag: str) -> Level:
    """The level whose stored attributes hold `tag` (PS3.18 10.6.3.3); unknown tags are instance level."""
    if tag in INDEXED:
        return INDEXED[tag]
    if tag in STUDY_TAGS or tag in STUDY_COMPUTED:
        return Level.STUDY
    if tag in SERIES_TAGS or tag in SERIES_COMPUTED:
        return Level.SERIES
    return Level.INSTANCE


def resolve(name: str, *, parameter: str) -> tuple[str, str, str | None]:
    """(tag, keyword, VR or None when the dictionary does not know the tag) for a keyword or 8-hex tag."""
    if "." in name:
        raise InvalidParameter(parameter, f"sequence matching is not supported: {name[:80]!a}")
    if _TAG.match(name):
        tag = name.upper()
        keyword = keyword_for_tag(int(tag, 16)) or tag
    elif _KEYWORD.match(name):
        number = tag_for_keyword(name)
        if number is None:
            raise InvalidParameter(parameter, f"not a DICOM keyword or tag: {name[:80]!a}")
        tag, keyword = f"{number:08X}", name
    else:
        raise InvalidParameter(parameter, f"not a DICOM keyword or tag: {name[:80]!a}")
    try:
        vr: str | None = dictionary_VR(int(tag, 16)).split(" or ")[0]
    except KeyError:
        vr = None
    return tag, keyword, vr


def parse_query(
    level: Level,
    pairs: list[tuple[str, str]],
    *,
    study_uid: UID | None = None,
    series_uid: UID | None = None,
) -> Query:
    """Parse the query pairs of a search at `level` (its path already checked into `study_uid`/`series_uid`)."""
    include: set[str] = set()
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    keys: dict[str, Filter] = {}
    unsupported: list[str] = []
    for name, value in pairs:
        if name in _RESERVED:
            continue
        label = _label(name)
        if "\x00" in value or "\x00" in name:
            raise InvalidParameter(label, "NUL characters are not allowed")
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    include_all = True
                elif item:
                    include.add(resolve(item.split(".")[0], parameter="includefield")[0])
        elif name == "limit":
            limit = _integer(label, value, MAX_OFFSET)
        elif name == "offset":
            offset = _integer(label, value, MAX_OFFSET)
        elif name == "fuzzymatching":
            fuzzy = _boolean(label, value)
        else:
            key = _key(name, label, value, keys, unsupported)
            if key is not None:
                keys[key.tag] = key
    filters = _scope_instance_keys(level, study_uid, series_uid, list(keys.values()), unsupported)
    return Query(
        level=level,
        study_uid=study_uid,
        series_uid=series_uid,
        filters=tuple(filters),
        include=frozenset(include),
        include_all=include_all,
        limit=min(limit, MAX_LIMIT) if limit else MAX_LIMIT,
        limit_requested=limit or None,
        offset=offset,
        fuzzy=fuzzy,
        unsupported=tuple(unsupported),
    )


def _integer(name: str, value: str, maximum: int) -> int:
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise InvalidParameter(name, f"expected a non-negative integer, got {value[:40]!a}")
    number = int(text)
    if number > maximum:
        raise InvalidParameter(name, f"{number} is larger than {maximum}")
    return number


def _boolean(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    raise InvalidParameter(name, f"expected true or false, got {value[:40]!a}")


def _label(name: str) -> str:
    """A parameter name fit for an error message and a Warning header: ASCII, bounded."""
    return ascii(name[:64])[1:-1]


def _key(name: str, label: str, value: str, seen: dict[str, Filter], unsupported: list[str]) -> Filter | None:
    tag, keyword, vr = resolve(name, parameter=label)
    name = label  # from here on only for messages
    if vr is None:
        unsupported.append(f"unsupported query key {name}: not in the DICOM dictionary")
        return None
    if vr in _UNMATCHABLE_VRS:
        raise InvalidParameter(name, f"{vr} attributes cannot be matched (sequence or binary value)")
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidParameter(name, f"value longer than {MAX_VALUE_CHARS} characters")
    key = Filter(tag, keyword, vr, level_of(tag), *_match(name, vr, tag, value), indexed=tag in INDEXED)
    previous = seen.get(tag)
    if previous is not None:
        key = _merge(name, previous, key)
    if key.match is Match.UNIVERSAL:
        return key
    if tag in _NOT_MATCHABLE:
        unsupported.append(f"unsupported query key {keyword}: computed attributes cannot be matched")
        return Filter(tag, keyword, vr, key.level, Match.UNIVERSAL, indexed=False)
    if not key.indexed and key.match is not Match.SINGLE:
        unsupported.append(f"unsupported query key {keyword}: only single value matching on this attribute")
        return Filter(tag, keyword, vr, key.level, Match.UNIVERSAL, indexed=False)
    return key


def _merge(name: str, first: Filter, second: Filter) -> Filter:
    """A repeated key is allowed for UID list matching: the lists are joined (any of them matches)."""
    if first.vr != "UI" and first.tag not in _CS_LISTS:
        raise InvalidParameter(name, "a matching key may be given once")
    if Match.UNIVERSAL in (first.match, second.match):
        return first if second.match is Match.UNIVERSAL else second
    values = tuple(dict.fromkeys(first.values + second.values))
    if first.match is Match.WILDCARD or second.match is Match.WILDCARD:
        raise InvalidParameter(name, "wild cards cannot be combined with a list")
    return Filter(first.tag, first.keyword, first.vr, first.level, Match.LIST, values, first.indexed)


def _match(name: str, vr: str, tag: str, value: str) -> tuple[Match, tuple[str, ...]]:
    if value.strip("*") == "":  # a lone `*` is universal matching too (C.2.2.2.4)
        return Match.UNIVERSAL, ()
    if vr == "UI":
        uids = [u.strip() for u in _UID_SEPARATORS.split(value)]
        _check_list(name, uids)
        bad = [u for u in uids if not is_valid_uid(u)]
        if bad:
            raise InvalidParameter(name, f"not a valid DICOM UID: {bad[0][:80]!a}")
        return (Match.LIST, tuple(dict.fromkeys(uids))) if len(uids) > 1 else (Match.SINGLE, (uids[0],))
    if vr in _RANGE_VRS:
        return _date_time(name, vr, value)
    if vr in INT_VRS or vr in FLOAT_VRS:
        number = _number(name, vr, value)
        if tag in INDEXED and abs(number) >= 2**31:  # integer columns
            raise InvalidParameter(name, f"number out of range: {value[:40]!a}")
        return Match.SINGLE, (value.strip(),)
    if tag in _CS_LISTS and _UID_SEPARATORS.search(value):
        codes = [c.strip() for c in _UID_SEPARATORS.split(value)]
        _check_list(name, codes)
        if any("*" in c or "?" in c for c in codes):
            raise InvalidParameter(name, "wild cards cannot be combined with a list")
        return Match.LIST, tuple(dict.fromkeys(codes))
    if vr == "PN" and value.count("=") > 2:
        raise InvalidParameter(name, "a person name has at most three component groups (PS3.5 6.2.1)")
    if "*" in value or "?" in value:
        return Match.WILDCARD, (value,)
    return Match.SINGLE, (value,)


def _check_list(name: str, items: list[str]) -> None:
    if len(items) > MAX_LIST_VALUES:
        raise InvalidParameter(name, f"more than {MAX_LIST_VALUES} values")
    if any(not item for item in items):
        raise InvalidParameter(name, "empty value in a list")


def _number(name: str, vr: str, value: str) -> float:
    text = value.strip()
    try:
        number = float(int(text)) if vr in INT_VRS else float(text)
    except ValueError:
        kind = "an integer" if vr in INT_VRS else "a number"
        raise InvalidParameter(name, f"expected {kind} ({vr}), got {value[:40]!a}") from None
    if number != number or number in (float("inf"), float("-inf")) or abs(number) >= 2**63:
        raise InvalidParameter(name, f"number out of range: {value[:40]!a}")
    return number


def _date_time(name: str, vr: str, value: str) -> tuple[Match, tuple[str, ...]]:
    check = {"DA": _is_date, "TM": _is_time, "DT": _is_datetime}[vr]
    if check(value):
        return Match.SINGLE, (value,)
    for i, ch in enumerate(value):
        if ch != "-":
            continue
        low, high = value[:i], value[i + 1 :]
        if (low or high) and (not low or check(low)) and (not high or check(high)):
            if low and high and low > high:
                raise InvalidParameter(name, f"range starts after it ends: {value[:40]!a}")
            return Match.RANGE, (low, high)
    kind = {"DA": "date YYYYMMDD", "TM": "time HHMMSS.FFFFFF", "DT": "date-time"}[vr]
    raise InvalidParameter(name, f"expected a {kind} or a range of them, got {value[:40]!a}")


def _is_date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit() or not text.isascii():
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _is_time(text: str) -> bool:
    return _TM.match(text) is not None


def _is_datetime(text: str) -> bool:
    if _DT.match(text) is None:
        return False
    core = text[:4] + re.split(r"[+-]", text[4:])[0]
    if len(core) >= 8:
        return _is_date(core[:8])
    return len(core) < 6 or "01" <= core[4:6] <= "12"


def _scope_instance_keys(
    level: Level, study_uid: UID | None, series_uid: UID | None, keys: list[Filter], unsupported: list[str]
) -> list[Filter]:
    """Instance metadata is not indexed: its attributes are matched only inside a named study or series, so
    that one request never parses every instance of the archive."""
    scoped = (
        study_uid is not None
        or series_uid is not None
        or any(k.tag in _SCOPING_KEYS and k.match in (Match.SINGLE, Match.LIST) for k in keys)
    )
    out = []
    for k in keys:
        if not k.indexed and k.level is Level.INSTANCE and k.match is not Match.UNIVERSAL and not scoped:
            unsupported.append(
                f"unsupported query key {k.keyword}: instance attributes are matched only within a study"
            )
            k = Filter(k.tag, k.keyword, k.vr, k.level, Match.UNIVERSAL, indexed=False)
        out.append(k)
    return out
