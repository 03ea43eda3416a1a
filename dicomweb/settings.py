"""The DICOMweb and DIMSE section of the settings: storage, ingest limits, renditions, the DICOM AE. Every field
names its environment variable (`setting(...)`, server/platform/settings.py) and is documented in the README."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dicomweb.dimse.config import DimseConfig, DimseConfigError, ae_title, parse_destinations, parse_peers, parse_routes
from dicomweb.dimse.config import check as check_dimse
from dicomweb.dimse.config import check_tls as check_dimse_tls
from dicomweb.dimse.config import parse_tls as parse_dimse_tls
from server.platform.settings import (
    PlatformSettings,
    S3Settings,
    SettingsError,
    boolean,
    choice,
    integer,
    items,
    s3_location,
    setting,
)


def _ae_title(name: str, raw: str) -> str:
    try:
        return ae_title(raw)
    except DimseConfigError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def _dimse_max_pdu(name: str, raw: str) -> int:
    """`HOUNSFIELD_DIMSE_MAX_PDU`: 0 (no limit) or 4096 bytes to 64 MiB."""
    value: int = integer(0, 64 * 1_048_576)(name, raw)
    if 0 < value < 4096:
        raise SettingsError(f"{name}: {value} is below 4096 bytes (0 means no limit)")
    return value


def _dimse(env: Mapping[str, str]) -> DimseConfig:
    name = "HOUNSFIELD_DIMSE_PEERS"
    try:
        peers = parse_peers(env.get(name, ""))
        name = "HOUNSFIELD_DIMSE_DESTINATIONS"
        destinations = parse_destinations(env.get(name, ""))
        name = "HOUNSFIELD_DIMSE_ROUTES"
        config = DimseConfig(peers, destinations, parse_routes(env.get(name, "")))
        check_dimse(config)
        name = "HOUNSFIELD_DIMSE_TLS"
        tls = (env.get(f"{name}_{part}", "") for part in ("CERT", "KEY", "CA", "PORT", "CLIENT_CERTS", "ONLY"))
        config = replace(config, tls=parse_dimse_tls(*tls))
        check_dimse_tls(config)
    except DimseConfigError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return config


DEFAULT_RENDITIONS = ("1.2.840.10008.1.2.4.202",)
"""HTJ2K lossless RPCL: what progressive viewers (OHIF/Cornerstone3D) ask frames in."""


@dataclass(frozen=True)
class DicomwebSettings(PlatformSettings):
    """What DICOMweb and DIMSE read."""

    storage_url: str | None = None
    """`HOUNSFIELD_STORAGE_URL`: `s3://bucket/prefix` or a folder path; default `<data>/blobs`."""
    s3: S3Settings | None = None
    overwrite: bool = setting("HOUNSFIELD_OVERWRITE", False, parse=boolean)
    """`HOUNSFIELD_OVERWRITE`: a STOW of an existing SOP Instance UID with different bytes replaces it (true) or
    fails with a reason (false, the default). Identical bytes are always an idempotent success."""
    max_instance_bytes: int = setting("HOUNSFIELD_MAX_INSTANCE_BYTES", 8 * 1024**3, parse=integer(1024))
    """`HOUNSFIELD_MAX_INSTANCE_BYTES`: an instance larger than this is refused with A700 (default 8 GiB), on every
    ingest channel (a STOW-RS part, a C-STORE data set, an imported file, an AI result: `dicomweb.ingest.spool`)."""
    max_part_header_bytes: int = setting("HOUNSFIELD_MAX_PART_HEADER_BYTES", 16 * 1024, parse=integer(256))
    """`HOUNSFIELD_MAX_PART_HEADER_BYTES`: larger multipart part headers get 413."""
    bulkdata_threshold: int = setting("HOUNSFIELD_BULKDATA_THRESHOLD", 1024, parse=integer(0))
    """`HOUNSFIELD_BULKDATA_THRESHOLD`: binary attributes longer than this become BulkDataURI in metadata."""
    gc_grace_seconds: int = setting("HOUNSFIELD_GC_GRACE_SECONDS", 3600, parse=integer(0))
    """`HOUNSFIELD_GC_GRACE_SECONDS`: blobs without an index row younger than this are left alone (they may
    belong to a store in flight)."""
    gc_interval_seconds: int = setting("HOUNSFIELD_GC_INTERVAL_SECONDS", 3600, parse=integer(1))
    """`HOUNSFIELD_GC_INTERVAL_SECONDS`: how often the orphan-blob sweep is scheduled."""
    dimse_enabled: bool = setting("HOUNSFIELD_DIMSE", True, parse=boolean)
    """`HOUNSFIELD_DIMSE`: run the DICOM Application Entity (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)."""
    dimse_port: int = setting("HOUNSFIELD_DIMSE_PORT", 11112, parse=integer(0, 65535))
    """`HOUNSFIELD_DIMSE_PORT`: the DIMSE port (bound on `HOUNSFIELD_HOST`)."""
    dimse_ae_title: str = setting("HOUNSFIELD_DIMSE_AE_TITLE", "HOUNSFIELD", parse=_ae_title)
    """`HOUNSFIELD_DIMSE_AE_TITLE`: this server's AE title (also the calling AE of C-MOVE and routing)."""
    dimse: DimseConfig = field(default_factory=DimseConfig)
    """`HOUNSFIELD_DIMSE_PEERS` (`TITLE=role[+role][:sub][@binding...],...`: the only calling AE titles accepted,
    where each may connect from and with which certificate, and their identities), `HOUNSFIELD_DIMSE_DESTINATIONS`
    (`TITLE@host:port[+tls],...`: C-MOVE and routing targets), `HOUNSFIELD_DIMSE_ROUTES` (auto-routing rules: a
    JSON array or a JSON file), `HOUNSFIELD_DIMSE_TLS_CERT`, `_KEY`, `_CA`, `_PORT`, `_CLIENT_CERTS`, `_ONLY`
    (DICOM TLS: `dimse.tls`); see dicomweb/dimse/config.py."""
    dimse_max_associations: int = setting("HOUNSFIELD_DIMSE_MAX_ASSOCIATIONS", 32, parse=integer(1, 1000))
    """`HOUNSFIELD_DIMSE_MAX_ASSOCIATIONS`: concurrent associations (of each server process); more are rejected
    (transient)."""
    dimse_intake_slot: int = 0
    """This process's C-STORE intake slot (`dicomweb.dimse.intake`): 0 for a lone server and the primary process,
    the slot it holds for the others (`hounsfield serve` with `HOUNSFIELD_PROCESSES` > 1). Not a variable."""
    dimse_timeout_seconds: int = setting("HOUNSFIELD_DIMSE_TIMEOUT_SECONDS", 30, parse=integer(1, 3600))
    """`HOUNSFIELD_DIMSE_TIMEOUT_SECONDS`: ACSE/DIMSE timeouts, and the longest one operation may wait on the
    server (index, blob store, policy)."""
    dimse_max_pdu: int = setting("HOUNSFIELD_DIMSE_MAX_PDU", 1_048_576, parse=_dimse_max_pdu)
    """`HOUNSFIELD_DIMSE_MAX_PDU`: the Maximum Length Received this AE proposes (PS3.8 D.1.1; 0: no limit).
    Peers cut data sets into P-DATA PDUs of at most this size, and each PDU costs pynetdicom's reactor a loop:
    1 MiB instead of pynetdicom's 16 KiB default takes a 512x512 CT image's receive from ~32 PDUs to one
    (a no-op pynetdicom SCP under storescu: 202 -> 250 images/s, 3.2 -> 2.2 ms CPU per image)."""
    dimse_early_ack: bool = setting("HOUNSFIELD_DIMSE_EARLY_ACK", True, parse=boolean)
    """`HOUNSFIELD_DIMSE_EARLY_ACK`: answer a C-STORE once every check that decides the answer has passed and the
    instance is durable in the intake (`<spool>/intake`, fsynced with its origin), and index it just after
    (true, the default: dicomweb/dimse/indexer.py); a crash is recovered by replaying the intake at start. False:
    the instance is indexed before the answer (read-after-write, as STOW-RS always is)."""
    renditions: tuple[str, ...] = DEFAULT_RENDITIONS
    """`HOUNSFIELD_RENDITIONS`: comma-separated transfer syntax UIDs each new image's frames are encoded in at
    ingest (a `rendition` job), so that frame requests in them never wait for an encoder. Default HTJ2K lossless
    RPCL (progressive loading by byte range); empty: none ahead of time (still made and kept on first demand)."""
    renditions_idle_seconds: float = setting(
        "HOUNSFIELD_RENDITIONS_IDLE_MS", 0.5, parse=integer(0, 3_600_000, per=1000)
    )
    """`HOUNSFIELD_RENDITIONS_IDLE_MS` (milliseconds, default 500): rendition jobs give way to ingest; this server's
    worker takes them once it has stored no instance for this long (0: at once), and a series' job that is running
    when instances arrive again starts no further image and waits again. Encoding alongside an ingest takes the
    CPU the instances arriving need; a client's requests follow one another far closer than this, so the wait
    holds renditions back for as long as an ingest goes on, and what it adds after the last store is short. Server
    processes that share the data folder count together (`dicomweb.ingest.activity.IngestActivity`). A frame
    request during an ingest encodes the frames it asks for itself, as for any image without a rendition."""
    renditions_max_wait_seconds: float = setting(
        "HOUNSFIELD_RENDITIONS_MAX_WAIT_S", 60.0, parse=integer(0, 86_400, per=1)
    )
    """`HOUNSFIELD_RENDITIONS_MAX_WAIT_S` (seconds, default 60): the most a rendition job waits for ingest to go quiet
    (under a continuous ingest, renditions are made this late)."""
    store_compression: str = setting("HOUNSFIELD_STORE_COMPRESSION", "none", parse=choice("none", "htj2k", "j2k"))
    """`HOUNSFIELD_STORE_COMPRESSION`: `none` (default: store as received), `htj2k` (HTJ2K lossless RPCL,
    1.2.840.10008.1.2.4.202, its own progressive rendition) or `j2k` (JPEG 2000 lossless, .4.90). Uncompressed
    images are stored compressed and verified bit-exact; every retrieve still returns exact pixels in any syntax."""

    @property
    def blob_dir(self) -> Path:
        if self.storage_url and not self.storage_url.startswith("s3://"):
            return Path(self.storage_url.removeprefix("file://"))
        return self.data_dir / "blobs"

    @property
    def spool_dir(self) -> Path:
        """Incoming parts are spooled here before validation; same file system as `blob_dir` by default so
        that the filesystem blob store can rename instead of copy."""
        if self.s3 is None:
            return self.blob_dir / ".spool"
        return self.data_dir / "spool"

    @property
    def intake_root(self) -> Path:
        """Acknowledged C-STOREs not indexed yet (`dicomweb.dimse.intake`): in the spool folder, so that a spooled
        instance is renamed into it on the same file system."""
        return self.spool_dir / "intake"

    @property
    def intake_dir(self) -> Path:
        """This process's intake slot (`dimse_intake_slot`) under `intake_root`."""
        return self.intake_root if self.dimse_intake_slot == 0 else self.intake_root / str(self.dimse_intake_slot)


def dicomweb_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The DICOMweb fields that need several variables: the storage location, the DIMSE peers, destinations,
    routes and TLS, the renditions."""
    storage_url = env.get("HOUNSFIELD_STORAGE_URL") or None
    s3 = None
    if storage_url and storage_url.startswith("s3://"):
        s3 = s3_location(env, storage_url)
        if not s3.bucket:
            raise SettingsError(f"HOUNSFIELD_STORAGE_URL: no bucket in {storage_url!r}")
    elif storage_url and "://" in storage_url and not storage_url.startswith("file://"):
        raise SettingsError(f"HOUNSFIELD_STORAGE_URL: expected s3://bucket/prefix or a folder, got {storage_url!r}")
    return {"storage_url": storage_url, "s3": s3, "dimse": _dimse(env), "renditions": _renditions(env)}


def _renditions(env: Mapping[str, str]) -> tuple[str, ...]:
    """`HOUNSFIELD_RENDITIONS`: unset means the default (HTJ2K RPCL); each value must be a syntax we encode."""
    if "HOUNSFIELD_RENDITIONS" not in env:
        return DEFAULT_RENDITIONS
    from dicomweb.pixels.encode import CODECS  # the encoders' table; imported only when the variable is set

    values = items("HOUNSFIELD_RENDITIONS", env["HOUNSFIELD_RENDITIONS"])
    unknown = [v for v in values if v not in CODECS]
    if unknown:
        raise SettingsError(f"HOUNSFIELD_RENDITIONS: no encoder for {unknown[0]!r}; one of {', '.join(CODECS)}")
    return values
