"""Settings.from_env: defaults, parsing, and validation errors that name the variable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.platform.settings import Variable
from server.settings import Settings, SettingsError

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_defaults_need_no_configuration() -> None:
    s = Settings.from_env({})
    assert s.host == "127.0.0.1" and s.port == 8080
    assert s.data_dir == Path("var") and s.database_url is None and s.s3 is None
    assert s.blob_dir == Path("var/blobs") and s.spool_dir == Path("var/blobs/.spool")
    assert (s.db_pool_min, s.db_pool_max) == (2, 10)
    assert s.overwrite is False and s.worker_enabled is True and s.processes == 1
    assert s.otel_exporter == "none" and s.public_url is None and s.cors_origins == ()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HOUNSFIELD_PORT": "abc"}, "HOUNSFIELD_PORT"),
        ({"HOUNSFIELD_PORT": "70000"}, "HOUNSFIELD_PORT"),
        ({"HOUNSFIELD_PORT": "-1"}, "HOUNSFIELD_PORT"),
        ({"HOUNSFIELD_OVERWRITE": "maybe"}, "HOUNSFIELD_OVERWRITE"),
        ({"HOUNSFIELD_WORKER": "2"}, "HOUNSFIELD_WORKER"),
        ({"HOUNSFIELD_PROCESSES": "0"}, "HOUNSFIELD_PROCESSES"),
        ({"HOUNSFIELD_DB_POOL_MIN": "0"}, "HOUNSFIELD_DB_POOL_MIN"),
        ({"HOUNSFIELD_DB_POOL_MIN": "5", "HOUNSFIELD_DB_POOL_MAX": "4"}, "HOUNSFIELD_DB_POOL_MAX"),
        ({"HOUNSFIELD_OTEL_EXPORTER": "zipkin"}, "HOUNSFIELD_OTEL_EXPORTER"),
        ({"HOUNSFIELD_PUBLIC_URL": "ftp://example.org"}, "HOUNSFIELD_PUBLIC_URL"),
        ({"HOUNSFIELD_PUBLIC_URL": "example.org/dicom"}, "HOUNSFIELD_PUBLIC_URL"),
        ({"HOUNSFIELD_STORAGE_URL": "s3://"}, "HOUNSFIELD_STORAGE_URL"),
        ({"HOUNSFIELD_STORAGE_URL": "gs://bucket/x"}, "HOUNSFIELD_STORAGE_URL"),
        (
            {"HOUNSFIELD_STORAGE_URL": "s3://b", "HOUNSFIELD_S3_MULTIPART_THRESHOLD": "1024"},
            "HOUNSFIELD_S3_MULTIPART_THRESHOLD",
        ),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"),
        ({"HOUNSFIELD_MAX_INSTANCE_BYTES": "12"}, "HOUNSFIELD_MAX_INSTANCE_BYTES"),
        ({"HOUNSFIELD_GC_INTERVAL_SECONDS": "0"}, "HOUNSFIELD_GC_INTERVAL_SECONDS"),
        ({"HOUNSFIELD_MALLOC_ARENAS": "-1"}, "HOUNSFIELD_MALLOC_ARENAS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value).startswith(variable)


def test_bool_spellings() -> None:
    for raw, expected in [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
        ("", False),
    ]:
        assert Settings.from_env({"HOUNSFIELD_OVERWRITE": raw}).overwrite is expected


def test_s3_storage_url() -> None:
    s = Settings.from_env(
        {
            "HOUNSFIELD_STORAGE_URL": "s3://my-bucket/some/prefix/",
            "HOUNSFIELD_S3_ENDPOINT": "http://127.0.0.1:9000",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "HOUNSFIELD_DATA": "/srv/hf",
        }
    )
    assert s.s3 is not None
    assert (s.s3.bucket, s.s3.prefix, s.s3.endpoint_url) == ("my-bucket", "some/prefix", "http://127.0.0.1:9000")
    assert (s.s3.region, s.s3.access_key_id, s.s3.secret_access_key) == ("eu-west-1", "AKIAEXAMPLE", "very-secret")
    assert "very-secret" not in repr(s)  # the secret is never shown
    assert s.spool_dir == Path("/srv/hf/spool")  # spooling stays local when blobs go to S3
    region = Settings.from_env(
        {"HOUNSFIELD_STORAGE_URL": "s3://b", "HOUNSFIELD_S3_REGION": "us-west-2", "AWS_DEFAULT_REGION": "eu-west-1"}
    )
    assert region.s3 is not None and region.s3.region == "us-west-2" and region.s3.prefix == ""


def test_folder_storage_url() -> None:
    s = Settings.from_env({"HOUNSFIELD_STORAGE_URL": "file:///mnt/blobs"})
    assert s.s3 is None and s.blob_dir == Path("/mnt/blobs") and s.spool_dir == Path("/mnt/blobs/.spool")
    assert Settings.from_env({"HOUNSFIELD_STORAGE_URL": "/data/b"}).blob_dir == Path("/data/b")


def test_other_values() -> None:
    s = Settings.from_env(
        {
            "HOUNSFIELD_PUBLIC_URL": "https://pacs.example.org/archive/",
            "HOUNSFIELD_CORS_ORIGINS": "https://a.example, https://b.example,,",
            "HOUNSFIELD_OTEL_EXPORTER": "OTLP",
            "HOUNSFIELD_LOG_LEVEL": "DEBUG",
            "DATABASE_URL": "postgresql://u:p@db/hf",
            "HOUNSFIELD_DB_POOL_MIN": "3",
            "HOUNSFIELD_DB_POOL_MAX": "3",
        }
    )
    assert s.public_url == "https://pacs.example.org/archive"
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.otel_exporter == "otlp" and s.log_level == "debug"
    assert s.database_url == "postgresql://u:p@db/hf" and (s.db_pool_min, s.db_pool_max) == (3, 3)


def test_overrides_and_frozen() -> None:
    s = Settings.from_env({}, port=9999)
    assert s.port == 9999
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_smart_endpoints_and_public_discovery_paths() -> None:
    s = Settings.from_env({})
    assert "/fhir/metadata" in s.auth_public_paths and "/.well-known/smart-configuration" in s.auth_public_paths
    assert s.smart_token_url is None and s.smart_authorization_url is None
    s = Settings.from_env(
        {"HOUNSFIELD_SMART_TOKEN_URL": "https://idp/token", "HOUNSFIELD_SMART_AUTHORIZE_URL": "https://idp/auth"}
    )
    assert (s.smart_token_url, s.smart_authorization_url) == ("https://idp/token", "https://idp/auth")
    with pytest.raises(SettingsError, match="HOUNSFIELD_SMART_TOKEN_URL"):
        Settings.from_env({"HOUNSFIELD_SMART_TOKEN_URL": "idp/token"})


def test_fhir_subscription_endpoints_and_attempts() -> None:
    s = Settings.from_env({})
    assert s.fhir_subscription_endpoints == () and s.fhir_subscription_attempts == 8
    s = Settings.from_env(
        {
            "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS": "https://ehr.example.org/hooks/, http://127.0.0.1:9000",
            "HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS": "3",
        }
    )
    assert s.fhir_subscription_endpoints == ("https://ehr.example.org/hooks/", "http://127.0.0.1:9000")
    assert s.fhir_subscription_attempts == 3
    for bad in ("ftp://ehr/x", "ehr.example.org/hooks", "https://user:pw@ehr/x", "https://ehr/x?k=1", "https://"):
        with pytest.raises(SettingsError, match=r"^HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS"):
            Settings.from_env({"HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS": bad})
    with pytest.raises(SettingsError, match=r"^HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS"):
        Settings.from_env({"HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS": "0"})


def test_dimse_settings() -> None:
    s = Settings.from_env({})
    assert (s.dimse_enabled, s.dimse_port, s.dimse_ae_title) == (True, 11112, "HOUNSFIELD")
    assert s.dimse.peers == () and s.dimse.destinations == () and s.dimse.routes == ()
    assert s.dimse_max_pdu == 1_048_576
    assert Settings.from_env({"HOUNSFIELD_DIMSE_MAX_PDU": "0"}).dimse_max_pdu == 0  # no limit
    for bad_pdu in ("1000", "-1", "big"):
        with pytest.raises(SettingsError, match=r"^HOUNSFIELD_DIMSE_MAX_PDU"):
            Settings.from_env({"HOUNSFIELD_DIMSE_MAX_PDU": bad_pdu})
    rules = '[{"destination": "PACS", "modality": ["CT", "MR"], "attributes": {"PatientID": "P*"}}]'
    s = Settings.from_env(
        {
            "HOUNSFIELD_DIMSE": "off",
            "HOUNSFIELD_DIMSE_PORT": "104",
            "HOUNSFIELD_DIMSE_AE_TITLE": " ARCHIVE ",
            "HOUNSFIELD_DIMSE_PEERS": "CT1=technologist, WS1=referring+radiologist:dr-who",
            "HOUNSFIELD_DIMSE_DESTINATIONS": "PACS@10.0.0.2:104,VIEW@[::1]:11113",
            "HOUNSFIELD_DIMSE_ROUTES": rules,
        }
    )
    assert not s.dimse_enabled and s.dimse_port == 104 and s.dimse_ae_title == "ARCHIVE"
    ws1 = s.dimse.peer("WS1")
    assert ws1 is not None and (ws1.sub, ws1.roles) == ("dr-who", ("referring", "radiologist"))
    ct1, view = s.dimse.peer("CT1"), s.dimse.destination("VIEW")
    assert ct1 is not None and ct1.sub == "CT1" and view is not None and (view.host, view.port) == ("::1", 11113)
    (rule,) = s.dimse.routes
    assert rule.matches(None, "MR", "1.2", {"00100020": "P12"}) and not rule.matches(None, "MR", "1.2", {})
    assert not rule.matches(None, "US", "1.2", {"00100020": "P12"})
    bad = {
        "HOUNSFIELD_DIMSE_AE_TITLE": "A_TITLE_THAT_IS_TOO_LONG",
        "HOUNSFIELD_DIMSE_PEERS": "CT1",
        "HOUNSFIELD_DIMSE_DESTINATIONS": "PACS@host",
        "HOUNSFIELD_DIMSE_ROUTES": '[{"destination": "NOWHERE"}]',
        "HOUNSFIELD_DIMSE_PORT": "70000",
    }
    for variable, value in bad.items():
        with pytest.raises(SettingsError, match=rf"^{variable}"):
            Settings.from_env({variable: value})
    with pytest.raises(SettingsError, match="HOUNSFIELD_DIMSE_ROUTES: routing rule 0: 'Nonsense'"):
        Settings.from_env(
            {
                "HOUNSFIELD_DIMSE_DESTINATIONS": "PACS@h:104",
                "HOUNSFIELD_DIMSE_ROUTES": '[{"destination": "PACS", "attributes": {"Nonsense": "x"}}]',
            }
        )


def test_malloc_arenas() -> None:
    """One glibc arena per CPU by default, applied by `hounsfield serve` before its threads start."""
    import os

    from server.cli import limit_malloc_arenas

    assert Settings.from_env({}).malloc_arenas == (os.cpu_count() or 2)
    assert Settings.from_env({"HOUNSFIELD_MALLOC_ARENAS": "0"}).malloc_arenas == 0
    assert limit_malloc_arenas(0) is False  # glibc's own default stays
    assert limit_malloc_arenas(os.cpu_count() or 2) is True  # these machines run glibc


# --- generated from the declared fields (`setting(...)`): every variable, without anyone listing them -----------

DECLARED = [(f.name, f.metadata["env"]) for f in dataclasses.fields(Settings) if "env" in f.metadata]
"""(field, its variable) of every field read from one environment variable."""
NOT_A_VALUE = "\x00not-a-value\x00"


@pytest.mark.parametrize(("field", "variable"), DECLARED, ids=[v.name for _, v in DECLARED])
def test_each_declared_variable_is_read_documented_and_checked(field: str, variable: Variable) -> None:
    """Unset and empty both give the field's one default; the README's configuration documents the variable; a
    value is either refused with an error naming the variable (the server does not start) or read into the field
    (free text: a folder, a list of origins)."""
    default = getattr(Settings.from_env({}), field)
    assert getattr(Settings.from_env({variable.name: ""}), field) == default
    assert variable.name in README, f"{variable.name} is not in the README"
    try:
        value = getattr(Settings.from_env({variable.name: NOT_A_VALUE}), field)
    except SettingsError as exc:
        assert str(exc).startswith(variable.name), exc
    else:
        assert value == variable.parse(variable.name, NOT_A_VALUE) != default


def test_the_declared_defaults_are_the_dataclass_defaults() -> None:
    """One default per field: what the environment leaves unset is what `Settings()` holds (the CPU-dependent
    arena count aside, a factory in both)."""
    loaded, constructed = Settings.from_env({}), Settings()
    for field, _variable in DECLARED:
        assert getattr(loaded, field) == getattr(constructed, field), field
