"""QIDO-RS query parsing (dicomweb/search/query.py) without a database: matching kinds of PS3.4 C.2.2.2."""

from __future__ import annotations

import pytest

from dicomweb.errors import InvalidParameter
from dicomweb.index.search import json_value, like_pattern, time_upper_bound
from dicomweb.search.query import MAX_LIMIT, Level, Match, Query, level_of, parse_query
from dicomweb.uids import study_uid


def one(level: Level, name: str, value: str) -> Query:
    return parse_query(level, [(name, value)])


def test_defaults() -> None:
    q = parse_query(Level.STUDY, [])
    assert q.level is Level.STUDY and q.filters == () and q.include == frozenset()
    assert q.limit == MAX_LIMIT and q.limit_requested is None and q.offset == 0 and not q.fuzzy
    assert not q.include_all and q.unsupported == ()


def test_keyword_and_tag_name_the_same_key() -> None:
    by_keyword = one(Level.STUDY, "PatientID", "X1").filters[0]
    by_tag = one(Level.STUDY, "00100020", "X1").filters[0]
    assert by_keyword == by_tag
    assert by_tag.tag == "00100020" and by_tag.keyword == "PatientID" and by_tag.vr == "LO"
    assert by_tag.match is Match.SINGLE and by_tag.values == ("X1",) and by_tag.indexed


def test_lower_case_hex_tag() -> None:
    f = one(Level.STUDY, "0008103e", "x").filters[0]
    assert f.tag == "0008103E" and f.keyword == "SeriesDescription" and f.level is Level.SERIES


@pytest.mark.parametrize(
    ("name", "value", "match", "values"),
    [
        ("PatientName", "", Match.UNIVERSAL, ()),
        ("PatientName", "*", Match.UNIVERSAL, ()),
        ("PatientName", "Doe*", Match.WILDCARD, ("Doe*",)),
        ("PatientName", "D?e", Match.WILDCARD, ("D?e",)),
        ("PatientName", "Doe^John", Match.SINGLE, ("Doe^John",)),
        ("StudyInstanceUID", "1.2.3", Match.SINGLE, ("1.2.3",)),
        ("StudyInstanceUID", "1.2.3\\1.2.4", Match.LIST, ("1.2.3", "1.2.4")),
        ("StudyInstanceUID", "1.2.3,1.2.4,1.2.3", Match.LIST, ("1.2.3", "1.2.4")),
        ("ModalitiesInStudy", "CT,MR", Match.LIST, ("CT", "MR")),
        ("ModalitiesInStudy", "CT\\MR", Match.LIST, ("CT", "MR")),
        ("StudyDate", "20200101", Match.SINGLE, ("20200101",)),
        ("StudyDate", "20200101-20201231", Match.RANGE, ("20200101", "20201231")),
        ("StudyDate", "20200101-", Match.RANGE, ("20200101", "")),
        ("StudyDate", "-20201231", Match.RANGE, ("", "20201231")),
        ("StudyTime", "0930-1100", Match.RANGE, ("0930", "1100")),
        ("StudyTime", "093000.5", Match.SINGLE, ("093000.5",)),
        ("AcquisitionDateTime", "20200101120000-0500", Match.SINGLE, ("20200101120000-0500",)),
        ("SeriesNumber", "3", Match.SINGLE, ("3",)),
    ],
)
def test_matching_kinds(name: str, value: str, match: Match, values: tuple[str, ...]) -> None:
    q = parse_query(Level.INSTANCE, [(name, value)], study_uid=study_uid("1.2.3"))
    f = q.filters[0]
    assert (f.match, f.values) == (match, values)
    assert q.unsupported == ()


def test_datetime_range_with_offsets() -> None:
    q = parse_query(Level.INSTANCE, [("AcquisitionDateTime", "2020-0500-2021+0100")], study_uid=study_uid("1.2"))
    f = q.filters[0]
    # A valid range, but ranges are served on indexed keys only: returned, not matched, and reported.
    assert f.match is Match.UNIVERSAL and not f.indexed and f.level is Level.INSTANCE
    assert "AcquisitionDateTime" in q.unsupported[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("StudyInstanceUID", "1.2.abc"),
        ("StudyInstanceUID", "01.2"),
        ("StudyInstanceUID", "1.2,,1.3"),
        ("SOPInstanceUID", "1.2*"),
        ("StudyDate", "2020-01-01"),
        ("StudyDate", "20201301"),
        ("StudyDate", "20201231-20200101"),
        ("StudyDate", "-"),
        ("StudyDate", "2020*"),
        ("StudyTime", "2500"),
        ("StudyTime", "09:30"),
        ("PatientBirthDate", "yesterday"),
        ("AcquisitionDateTime", "202013"),
        ("AcquisitionDateTime", "2020-0500-2019"),
        ("SeriesNumber", "one"),
        ("SeriesNumber", "1*"),
        ("SeriesNumber", "99999999999"),
        ("InstanceNumber", "1.5"),
        ("SliceThickness", "thin"),
        ("patientname", "x"),
        ("NotAKeyword", "x"),
        ("0010001G", "x"),
        ("(0010,0010)", "x"),
        ("ReferencedSeriesSequence", "x"),
        ("ReferencedSeriesSequence.SeriesInstanceUID", "1.2"),
        ("PixelData", "x"),
        ("ModalitiesInStudy", "CT,M*"),
        ("PatientName", "x" * 2000),
        ("limit", "ten"),
        ("limit", "-1"),
        ("limit", ""),
        ("offset", "1.5"),
        ("offset", "99999999999999999999"),
        ("fuzzymatching", "yes"),
        ("includefield", "NotAKeyword"),
        ("includefield", "0010,0010"),
    ],
)
def test_malformed_is_invalid_parameter(name: str, value: str) -> None:
    with pytest.raises(InvalidParameter):
        parse_query(Level.STUDY, [(name, value)])


def test_repeated_keys() -> None:
    q = parse_query(Level.STUDY, [("StudyInstanceUID", "1.2"), ("StudyInstanceUID", "1.3\\1.4")])
    assert q.filters[0].match is Match.LIST and q.filters[0].values == ("1.2", "1.3", "1.4")
    with pytest.raises(InvalidParameter):
        parse_query(Level.STUDY, [("PatientID", "a"), ("00100020", "b")])


def test_includefield_forms() -> None:
    q = parse_query(
        Level.STUDY,
        [("includefield", "00081030,Modality"), ("includefield", "PatientAge"), ("includefield", " 00100040 ")],
    )
    assert q.include == {"00081030", "00080060", "00101010", "00100040"}
    assert not q.include_all
    q = parse_query(Level.STUDY, [("includefield", "all")])
    assert q.include_all
    q = parse_query(Level.STUDY, [("includefield", "PatientName,all")])
    assert q.include_all and q.include == {"00100010"}
    q = parse_query(Level.STUDY, [("includefield", "ReferencedSeriesSequence.SeriesInstanceUID")])
    assert q.include == {"00081115"}


def test_return_tags_include_keys() -> None:
    q = parse_query(Level.STUDY, [("PatientAge", ""), ("includefield", "StudyDescription"), ("PatientID", "x")])
    assert q.return_tags == {"00101010", "00081030", "00100020"}


def test_limit_offset_fuzzy() -> None:
    q = parse_query(Level.SERIES, [("limit", "10"), ("offset", "20"), ("fuzzymatching", "TRUE")])
    assert (q.limit, q.limit_requested, q.offset, q.fuzzy) == (10, 10, 20, True)
    q = parse_query(Level.SERIES, [("limit", str(MAX_LIMIT * 5))])
    assert q.limit == MAX_LIMIT and q.limit_requested == MAX_LIMIT * 5
    q = parse_query(Level.SERIES, [("limit", "0"), ("fuzzymatching", "false")])
    assert q.limit == MAX_LIMIT and q.limit_requested is None and not q.fuzzy


def test_reserved_parameters_are_not_keys() -> None:
    q = parse_query(Level.STUDY, [("accept", "application/json"), ("charset", "utf-8")])
    assert q.filters == () and q.unsupported == ()


def test_unindexed_keys() -> None:
    # Study attribute without a column: single value by containment; a wild card cannot be served.
    q = parse_query(Level.STUDY, [("PatientAge", "045Y"), ("OtherPatientNames", "Smith*")])
    age, other = q.filters
    assert not age.indexed and age.match is Match.SINGLE and age.level is Level.STUDY
    assert other.match is Match.UNIVERSAL
    assert len(q.unsupported) == 1 and "OtherPatientNames" in q.unsupported[0]
    # Series attribute.
    q = parse_query(Level.SERIES, [("Manufacturer", "ACME")])
    assert q.filters[0].level is Level.SERIES and not q.filters[0].indexed and q.unsupported == ()
    # Private or unknown tags are ignored with a warning.
    q = parse_query(Level.STUDY, [("00091001", "x")])
    assert q.filters == () and "00091001" in q.unsupported[0]
    # Computed attributes are returned, never matched.
    q = parse_query(Level.STUDY, [("NumberOfStudyRelatedInstances", "3")])
    assert q.filters[0].match is Match.UNIVERSAL and q.unsupported


def test_instance_metadata_keys_need_a_scope() -> None:
    q = parse_query(Level.INSTANCE, [("SliceThickness", "5")])
    assert q.filters[0].match is Match.UNIVERSAL and "SliceThickness" in q.unsupported[0]
    q = parse_query(Level.INSTANCE, [("SliceThickness", "5")], study_uid=study_uid("1.2"))
    assert q.filters[0].match is Match.SINGLE and q.unsupported == ()
    q = parse_query(Level.INSTANCE, [("SliceThickness", "5"), ("SeriesInstanceUID", "1.2.3")])
    assert q.filters[0].match is Match.SINGLE and q.unsupported == ()


def test_levels() -> None:
    assert level_of("00100010") is Level.STUDY
    assert level_of("00080061") is Level.STUDY
    assert level_of("00080060") is Level.SERIES
    assert level_of("00201209") is Level.SERIES
    assert level_of("00080018") is Level.INSTANCE
    assert level_of("00180050") is Level.INSTANCE
    assert level_of("00091001") is Level.INSTANCE


def test_patterns_and_bounds() -> None:
    assert like_pattern("Doe^J*", person_name=True) == "DOE J%"
    assert like_pattern("a%b_c\\d?*", person_name=False) == "a\\%b\\_c\\\\d_%"
    assert like_pattern("  van^^Dyke*", person_name=True) == "VAN DYKE%"
    assert time_upper_bound("10") == "105959.999999"
    assert time_upper_bound("1030") == "103059.999999"
    assert time_upper_bound("103015") == "103015.999999"
    assert time_upper_bound("103015.5") == "103015.599999"


def test_containment_values() -> None:
    assert json_value("PN", "Doe^John") == {"Alphabetic": "Doe^John"}
    assert json_value("IS", " 42 ") == 42
    assert json_value("DS", "5.000") == 5 and json_value("DS", "0.8") == 0.8
    assert json_value("LO", "ACME") == "ACME"
