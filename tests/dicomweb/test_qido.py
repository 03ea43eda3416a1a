"""QIDO-RS (PS3.18 10.6) through dicomweb-client and raw HTTP, on a small generated archive.

Each test stores the same corpus once (three patients, four series, seven instances) and then asks many
questions of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.data import sample

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DICOM_JSON = "application/dicom+json"


@dataclass
class Corpus:
    studies: dict[str, str] = field(default_factory=dict)  # name -> Study Instance UID
    series: dict[str, str] = field(default_factory=dict)  # name -> Series Instance UID
    instances: dict[str, list[str]] = field(default_factory=dict)  # series name -> SOP Instance UIDs


def _instance(base: str, study: str, series: str, number: int, attrs: dict[str, Any]) -> Dataset:
    ds = pydicom.dcmread(sample(base))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = number
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    return ds


STUDIES: dict[str, dict[str, Any]] = {
    "A": dict(
        PatientName="Doe^John",
        PatientID="PID-A",
        PatientBirthDate="19700101",
        PatientSex="M",
        PatientAge="050Y",
        StudyDate="20200115",
        StudyTime="093000",
        AccessionNumber="ACC-1",
        StudyID="S1",
        StudyDescription="Chest CT",
        ReferringPhysicianName="Welby^Marcus",
    ),
    "B": dict(
        PatientName="SMITH^jane",
        PatientID="PID-B",
        PatientBirthDate="19851224",
        PatientSex="F",
        StudyDate="20210610",
        StudyTime="141500",
        AccessionNumber="ACC-2",
        StudyID="S2",
        StudyDescription="Brain MRI",
        ReferringPhysicianName="House^Gregory",
    ),
    "C": dict(
        PatientName="van Dyke^Anna",
        PatientID="PID-C",
        PatientSex="F",
        StudyDate=None,
        StudyTime=None,
        AccessionNumber="ACC-3",
        StudyDescription="chest x-ray",
    ),
}
# series name -> (study, base file, instance numbers in storing order, series attributes)
SERIES: dict[str, tuple[str, str, list[int], dict[str, Any]]] = {
    "A1": (
        "A",
        "CT_small.dcm",
        [3, 1, 2],
        dict(
            Modality="CT",
            SeriesNumber=1,
            SeriesDescription="Axial 5mm",
            BodyPartExamined="CHEST",
            PerformedProcedureStepStartDate="20200115",
            PerformedProcedureStepStartTime="093500",
        ),
    ),
    "A2": (
        "A",
        "CT_small.dcm",
        [1],
        dict(Modality="OT", SeriesNumber=2, SeriesDescription="Screenshots", SOPClassUID=SECONDARY_CAPTURE),
    ),
    "B1": (
        "B",
        "MR_small.dcm",
        [2, 1],
        dict(Modality="MR", SeriesNumber=1, SeriesDescription="T1 axial", BodyPartExamined="HEAD"),
    ),
    "C1": ("C", "CT_small.dcm", [1], dict(Modality="CR", SeriesNumber=1)),
}


def store_corpus(client: Any) -> Corpus:
    corpus = Corpus()
    corpus.studies = {name: generate_uid() for name in STUDIES}
    datasets = []
    for name, (study, base, numbers, attrs) in SERIES.items():
        corpus.series[name] = generate_uid()
        corpus.instances[name] = []
        for number in numbers:
            ds = _instance(base, corpus.studies[study], corpus.series[name], number, {**STUDIES[study], **attrs})
            corpus.instances[name].append(ds.SOPInstanceUID)
            datasets.append(ds)
    result = client.store_instances(datasets)
    assert "FailedSOPSequence" not in result
    return corpus


def value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if element is None or "Value" not in element:
        return None
    values = element["Value"]
    return values[0] if len(values) == 1 else values


def uids(items: list[dict[str, Any]], tag: str) -> list[str]:
    return [value(item, tag) for item in items]


def study_uids(items: list[dict[str, Any]]) -> list[str]:
    return uids(items, "0020000D")


def test_study_matching(client: Any, http: Any) -> None:
    c = store_corpus(client)
    A, B, C = c.studies["A"], c.studies["B"], c.studies["C"]

    def find(**filters: Any) -> list[str]:
        return study_uids(client.search_for_studies(search_filters=filters))

    def find_fuzzy(**filters: Any) -> list[str]:
        return study_uids(client.search_for_studies(search_filters=filters, fuzzymatching=True))

    # Newest first, studies without a date last.
    assert find() == [B, A, C]
    # Person names: case-insensitive single value and wild cards.
    assert find(PatientName="Doe^John") == [A]
    assert find(PatientName="doe^john") == [A]
    assert find(PatientName="DOE*") == [A]
    assert find(PatientName="*dyke*") == [C]
    assert find(PatientName="sm?th*") == [B]
    assert find(PatientName="jo") == []
    # Fuzzy: any name component by prefix.
    assert find_fuzzy(PatientName="jo") == [A]
    assert find_fuzzy(PatientName="an") == [C]
    assert find_fuzzy(PatientName="Smith") == [B]
    assert find_fuzzy(ReferringPhysicianName="greg") == [B]
    # Keys by tag, exact and wild card.
    assert find(**{"00100020": "PID-B"}) == [B]
    assert find(PatientID="PID-?") == [B, A, C]
    assert find(PatientID="pid-b") == []  # case-sensitive for everything but person names
    assert find(AccessionNumber="ACC-2") == [B]
    assert find(StudyID="S1") == [A]
    assert find(PatientSex="F") == [B, C]
    assert find(ReferringPhysicianName="house^gregory") == [B]
    # UID lists: backslash (DICOM) and comma (PS3.18 8.3.4.1) separated, and the key repeated.
    assert find(StudyInstanceUID=f"{A}\\{C}") == [A, C]
    r = http.get(f"/dicom-web/studies?StudyInstanceUID={A},{B}")
    assert r.status_code == 200 and study_uids(r.json()) == [B, A]
    r = http.get("/dicom-web/studies", params=[("StudyInstanceUID", A), ("StudyInstanceUID", C)])
    assert study_uids(r.json()) == [A, C]
    # Date and time ranges.
    assert find(StudyDate="20200101-20201231") == [A]
    assert find(StudyDate="20210101-") == [B]
    assert find(StudyDate="-20201231") == [A]
    assert find(StudyDate="20200115") == [A]
    assert find(StudyTime="1400-1500") == [B]
    assert find(StudyTime="09") == [A]  # matched to the precision given
    assert find(StudyTime="-0930") == [A]
    assert find(PatientBirthDate="-19801231") == [A]
    assert find(StudyDate="20200101-20201231", PatientName="smith*") == []
    # Descriptions: case-insensitive.
    assert find(StudyDescription="chest*") == [A, C]
    assert find(StudyDescription="chest ct") == [A]
    # Computed and lower-level keys.
    assert find(ModalitiesInStudy="CT") == [A]
    assert find(ModalitiesInStudy="MR,OT") == [B, A]
    assert find(ModalitiesInStudy="CR\\MR") == [B, C]
    assert find(SOPClassesInStudy=SECONDARY_CAPTURE) == [A]
    assert find(Modality="MR") == [B]
    assert find(SOPInstanceUID=c.instances["C1"][0]) == [C]
    assert find(Modality="CT", SOPClassUID=SECONDARY_CAPTURE) == []  # the same series must match both
    assert find(Modality="OT", SOPClassUID=SECONDARY_CAPTURE) == [A]
    # A stored attribute without a column: single value matching on the study attributes.
    assert find(PatientAge="050Y") == [A]
    # Nothing matches: 200 with an empty array.
    r = http.get("/dicom-web/studies?PatientID=nobody")
    assert r.status_code == 200 and r.json() == [] and r.headers["content-type"].startswith(DICOM_JSON)
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []


def test_study_attributes(client: Any, http: Any, server: Any) -> None:
    c = store_corpus(client)
    A, B = c.studies["A"], c.studies["B"]
    [a] = client.search_for_studies(search_filters={"StudyInstanceUID": A})
    assert a["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert value(a, "00100020") == "PID-A" and value(a, "00100030") == "19700101"
    assert value(a, "00080020") == "20200115" and value(a, "00080030") == "093000"
    assert value(a, "00080050") == "ACC-1" and value(a, "00200010") == "S1"
    assert value(a, "00081030") == "Chest CT" and value(a, "00080005") == "ISO_IR 100"
    assert a["00080061"] == {"vr": "CS", "Value": ["CT", "OT"]}
    assert a["00080062"] == {"vr": "UI", "Value": sorted([CT_IMAGE, SECONDARY_CAPTURE])}
    assert a["00201206"] == {"vr": "IS", "Value": [2]}
    assert a["00201208"] == {"vr": "IS", "Value": [4]}
    assert value(a, "00080056") == "ONLINE"
    assert a["00081190"]["vr"] == "UR" and value(a, "00081190").endswith(f"/dicom-web/studies/{A}")
    assert "00101010" not in a  # PatientAge is not returned unless asked for
    assert list(a) == sorted(a)
    # RetrieveURL follows the request's Host.
    [b] = http.get("/dicom-web/studies", params={"StudyInstanceUID": B}).json()
    assert value(b, "00081190") == f"{server.dicomweb}/studies/{B}"
    assert b["00080061"]["Value"] == ["MR"] and b["00201208"]["Value"] == [2]
    # Return keys: an empty value asks for the attribute; absent values come back empty.
    found = {value(r, "0020000D"): r for r in client.search_for_studies(search_filters={"PatientAge": ""})}
    assert value(found[A], "00101010") == "050Y"
    assert found[B]["00101010"] == {"vr": "AS"}
    # includefield: keyword, tag, comma-separated, repeated (dicomweb-client sends one parameter per field).
    for fields in (["PatientAge"], ["00101010"]):
        [r] = client.search_for_studies(search_filters={"StudyInstanceUID": A}, fields=fields)
        assert value(r, "00101010") == "050Y"
    [r] = client.search_for_studies(search_filters={"StudyInstanceUID": A}, fields=["PatientAge", "Manufacturer"])
    assert value(r, "00101010") == "050Y" and "00080070" not in r  # series attributes stay at their level
    [r] = http.get(f"/dicom-web/studies?StudyInstanceUID={A}&includefield=00101010,IssuerOfPatientID").json()
    assert value(r, "00101010") == "050Y" and r["00100021"] == {"vr": "LO"}
    [r] = http.get(f"/dicom-web/studies?StudyInstanceUID={A}&includefield=all").json()
    assert value(r, "00101010") == "050Y" and value(r, "00201208") == 4 and value(r, "00100040") == "M"
    # OHIF's study list request.
    r = http.get(
        "/dicom-web/studies",
        params={
            "PatientName": "*doe*",
            "limit": "101",
            "offset": "0",
            "fuzzymatching": "false",
            "includefield": "00081030,00080060",
        },
    )
    assert r.status_code == 200 and study_uids(r.json()) == [A]


def test_series_search(client: Any, http: Any) -> None:
    c = store_corpus(client)
    A, B = c.studies["A"], c.studies["B"]
    A1, A2, B1, C1 = (c.series[n] for n in ("A1", "A2", "B1", "C1"))

    def find(**filters: Any) -> list[str]:
        return uids(client.search_for_series(search_filters=filters), "0020000E")

    in_a = client.search_for_series(A)
    assert uids(in_a, "0020000E") == [A1, A2]  # by Series Number
    first = in_a[0]
    assert value(first, "0020000D") == A and value(first, "00080060") == "CT"
    assert value(first, "00200011") == 1 and value(first, "0008103E") == "Axial 5mm"
    assert value(first, "00400244") == "20200115" and value(first, "00400245") == "093500"
    assert first["00201209"] == {"vr": "IS", "Value": [3]} and in_a[1]["00201209"]["Value"] == [1]
    assert value(first, "00081190").endswith(f"/dicom-web/studies/{A}/series/{A1}")
    assert "00100010" not in first and "00201208" not in first  # the study is named by the path
    # All series: the study attributes come too (PS3.18 10.6.3.3).
    every = client.search_for_series()
    assert set(uids(every, "0020000E")) == {A1, A2, B1, C1}
    b1 = next(s for s in every if value(s, "0020000E") == B1)
    assert b1["00100010"]["Value"] == [{"Alphabetic": "SMITH^jane"}] and value(b1, "00201208") == 2
    assert value(b1, "00080061") == "MR" and value(b1, "00201209") == 2
    # Matching at the series level and above.
    assert find(Modality="CT") == [A1]
    assert find(Modality="CT\\MR") == [A1, B1]
    assert find(PatientName="smith*") == [B1]
    assert find(StudyDate="20200101-20201231") == [A1, A2]
    assert find(SeriesDescription="*axial*") == [A1, B1]
    assert find(SeriesNumber="2") == [A2]
    assert find(BodyPartExamined="HEAD") == [B1]
    assert find(PerformedProcedureStepStartDate="20200101-") == [A1]
    assert find(ModalitiesInStudy="MR") == [B1]
    assert find(SeriesInstanceUID=f"{A2},{C1}") == [A2, C1]
    assert find(SOPClassUID=SECONDARY_CAPTURE) == [A2]  # an instance key: series with such an instance
    assert find(Manufacturer="TOSHIBA_MEC") == [B1]  # stored series attribute without a column
    assert uids(client.search_for_series(B, search_filters={"Modality": "CT"}), "0020000E") == []
    # includefield=all at series level returns every stored series attribute.
    [r] = http.get(f"/dicom-web/studies/{B}/series?includefield=all").json()
    assert value(r, "00080070") == "TOSHIBA_MEC" and value(r, "00201209") == 2
    # A study that does not exist has no series.
    assert http.get("/dicom-web/studies/1.2.3.4/series").json() == []


def test_instance_search(client: Any, http: Any, server: Any) -> None:
    c = store_corpus(client)
    A, B = c.studies["A"], c.studies["B"]
    A1, B1 = c.series["A1"], c.series["B1"]

    def find(**filters: Any) -> list[str]:
        return uids(client.search_for_instances(search_filters=filters), "00080018")

    in_a1 = client.search_for_instances(A, A1)
    assert [value(i, "00200013") for i in in_a1] == [1, 2, 3]  # by Instance Number
    one = in_a1[0]
    assert value(one, "0020000D") == A and value(one, "0020000E") == A1
    assert value(one, "00080016") == CT_IMAGE and value(one, "00280010") == 128
    assert value(one, "00280011") == 128 and value(one, "00280100") == 16
    sop = value(one, "00080018")
    assert value(one, "00081190").endswith(f"/dicom-web/studies/{A}/series/{A1}/instances/{sop}")
    assert "00080060" not in one and "00100010" not in one  # study and series named by the path
    # In a study: series attributes come too; everywhere: study attributes too.
    in_a = client.search_for_instances(A)
    assert len(in_a) == 4 and {value(i, "00080060") for i in in_a} == {"CT", "OT"}
    assert {value(i, "00201209") for i in in_a} == {3, 1} and "00100010" not in in_a[0]
    every = client.search_for_instances()
    assert len(every) == 7 and all("00100010" in i and "00201208" in i for i in every)
    # Matching.
    assert len(find(PatientID="PID-B")) == 2
    assert find(SOPClassUID=SECONDARY_CAPTURE) == c.instances["A2"]
    assert len(find(InstanceNumber="2")) == 2
    picked = c.instances["A1"][:2]
    assert sorted(find(SOPInstanceUID=",".join(picked))) == sorted(picked)
    assert len(find(Modality="MR")) == 2
    assert len(find(Rows="64")) == 2
    assert find(StudyDate="20200101-20201231", SeriesNumber="2") == c.instances["A2"]
    # Instance metadata without a column: matched inside a study, ignored with a Warning elsewhere.
    assert len(uids(client.search_for_instances(A, search_filters={"SliceThickness": "5"}), "00080018")) == 4
    assert len(uids(client.search_for_instances(B, search_filters={"SliceThickness": "5"}), "00080018")) == 0
    assert len(client.search_for_instances(B, B1, search_filters={"SliceThickness": "0.8"})) == 2
    r = http.get("/dicom-web/instances?SliceThickness=5")
    assert r.status_code == 200 and len(r.json()) == 7
    assert 'hounsfield "unsupported query key SliceThickness' in r.headers["warning"]
    # includefield: a metadata attribute, and all (bulk data made absolute).
    [r1] = client.search_for_instances(A, A1, search_filters={"InstanceNumber": "1"}, fields=["PixelSpacing"])
    assert r1["00280030"]["vr"] == "DS" and len(r1["00280030"]["Value"]) == 2
    [r2] = http.get(f"/dicom-web/studies/{A}/series/{A1}/instances?InstanceNumber=1&includefield=all").json()
    assert r2["00280030"] == r1["00280030"] and value(r2, "00100010") == {"Alphabetic": "Doe^John"}
    assert r2["7FE00010"]["BulkDataURI"].startswith(f"{server.dicomweb}/studies/{A}/series/{A1}/instances/")
    assert value(r2, "00081190").endswith(value(r2, "00080018"))


def test_limit_offset_and_truncation(client: Any, http: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    c = store_corpus(client)
    A, B, C = c.studies["A"], c.studies["B"], c.studies["C"]

    def page(**params: Any) -> list[str]:
        r = http.get("/dicom-web/studies", params=params)
        assert r.status_code == 200 and "warning" not in r.headers
        return study_uids(r.json())

    assert page(limit=1) == [B]
    assert page(limit=1, offset=1) == [A]
    assert page(limit=2, offset=1) == [A, C]
    assert page(offset=3) == []
    assert page(limit=5000) == [B, A, C]
    assert study_uids(client.search_for_studies(limit=1, get_remaining=True)) == [B, A, C]
    instances = [value(i, "00080018") for i in client.search_for_instances(limit=3, offset=2)]
    assert len(instances) == 3
    # Results cut at the server's maximum carry a Warning that more can be requested (PS3.18 8.3.4.4).
    monkeypatch.setattr("dicomweb.search.query.MAX_LIMIT", 2)
    r = http.get("/dicom-web/studies")
    assert study_uids(r.json()) == [B, A] and "Additional results can be requested" in r.headers["warning"]
    r = http.get("/dicom-web/studies?limit=10")
    assert len(r.json()) == 2 and "Additional results" in r.headers["warning"]
    r = http.get("/dicom-web/studies?limit=2")
    assert len(r.json()) == 2 and "warning" not in r.headers
    r = http.get("/dicom-web/studies?offset=2")
    assert study_uids(r.json()) == [C] and "warning" not in r.headers


BAD_REQUESTS = [
    "/dicom-web/studies?StudyDate=2020-01-01",
    "/dicom-web/studies?StudyDate=20201231-20200101",
    "/dicom-web/studies?StudyTime=9am",
    "/dicom-web/studies?StudyInstanceUID=abc",
    "/dicom-web/series?SeriesInstanceUID=1.2.*",
    "/dicom-web/studies?limit=ten",
    "/dicom-web/studies?limit=-1",
    "/dicom-web/studies?offset=1e3",
    "/dicom-web/studies?Foo=1",
    "/dicom-web/studies?0010001G=1",
    "/dicom-web/studies?ReferencedStudySequence=1",
    "/dicom-web/studies?ReferencedSeriesSequence.SeriesInstanceUID=1.2",
    "/dicom-web/studies?includefield=NotAKeyword",
    "/dicom-web/studies?fuzzymatching=maybe",
    "/dicom-web/studies?PatientID=a&PatientID=b",
    "/dicom-web/series?SeriesNumber=one",
    "/dicom-web/instances?InstanceNumber=99999999999",
    "/dicom-web/studies?PatientName=a%00b",
    "/dicom-web/studies/not-a-uid/series",
    "/dicom-web/studies/1.2.3/series/1.02/instances",
    "/dicom-web/studies/1.2..3/instances",
]


def test_bad_requests_are_400(http: Any) -> None:
    """Malformed keys and values are refused with 400 and a Warning header, never a 500 (one server for all)."""
    for path in BAD_REQUESTS:
        r = http.get(path)
        assert r.status_code == 400, (path, r.text)
        assert r.headers["warning"].startswith("299 hounsfield "), path
        assert r.json()["status"] == 400, path


def test_odd_values_never_500(client: Any, http: Any) -> None:
    """Every key kind against awkward values: a result or a 400, never a server error."""
    store_corpus(client)
    keys = [
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyTime",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "SeriesNumber",
        "StudyDescription",
        "ReferringPhysicianName",
        "PatientAge",
        "Manufacturer",
        "SliceThickness",
        "ImageType",
        "00091001",
        "AcquisitionDateTime",
    ]
    values = [
        "",
        "*",
        "**",
        "?",
        "a*b?",
        "\\",
        "%",
        "_",
        "'",
        "1-2",
        "-",
        "20200101-",
        "x" * 300,
        "é^ü*",
        "1.2.3",
        "CT,MR",
        "=",
        "^",
        "5",
        "1e400",
    ]
    for resource in ("studies", "series", "instances"):
        for key in keys:
            for v in values:
                for fuzzy in ("false", "true"):
                    r = http.get(f"/dicom-web/{resource}", params={key: v, "fuzzymatching": fuzzy})
                    assert r.status_code in (200, 400), (resource, key, v, r.status_code, r.text)
    for raw in ("PatientName=%ED%A0%80", "PatientName=%FF*", "StudyInstanceUID=%FF", "includefield=%FF"):
        r = http.get(f"/dicom-web/studies?{raw}")
        assert r.status_code in (200, 400), (raw, r.status_code, r.text)


def test_unsupported_keys_warn(client: Any, http: Any) -> None:
    c = store_corpus(client)
    for query in ("00091001=x", "OtherPatientNames=Sm*", "NumberOfStudyRelatedInstances=4", "PatientAge=0*"):
        r = http.get(f"/dicom-web/studies?{query}")
        assert r.status_code == 200 and len(r.json()) == 3, query
        assert r.headers["warning"].startswith('299 hounsfield "unsupported query key '), query
    r = http.get("/dicom-web/studies?PatientID=PID-A&00091001=x&00091002=y")
    assert study_uids(r.json()) == [c.studies["A"]] and r.headers["warning"].count("299 hounsfield") == 2


def test_accept(client: Any, http: Any) -> None:
    store_corpus(client)
    for accept, expected in [
        (DICOM_JSON, DICOM_JSON),
        ("application/json", "application/json"),
        ("*/*", DICOM_JSON),
        ("application/*", DICOM_JSON),
        ("application/dicom+json, application/json;q=0.5", DICOM_JSON),
        ("application/json, application/dicom+json;q=0.5", "application/json"),
        ('multipart/related; type="application/dicom+xml", application/dicom+json;q=0.1', DICOM_JSON),
    ]:
        r = http.get("/dicom-web/studies", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith(expected), accept
        assert len(r.json()) == 3
    for accept in ("application/dicom", 'multipart/related; type="application/dicom+xml"', "text/html"):
        r = http.get("/dicom-web/series", headers={"Accept": accept})
        assert r.status_code == 406, accept
    # The accept query parameter replaces the header (PS3.18 8.3.3.1).
    r = http.get("/dicom-web/instances", params={"accept": DICOM_JSON}, headers={"Accept": "application/dicom"})
    assert r.status_code == 200 and len(r.json()) == 7
    r = http.get("/dicom-web/studies", params={"accept": "application/dicom"}, headers={"Accept": DICOM_JSON})
    assert r.status_code == 406
