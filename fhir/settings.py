"""The FHIR section of the settings: bundles, ImagingStudy sync, Subscriptions. Every field names its environment
variable (`setting(...)`, server/platform/settings.py) and is documented in the README."""

from __future__ import annotations

from dataclasses import dataclass

from server.platform.settings import PlatformSettings, integer, setting, url_prefixes


@dataclass(frozen=True)
class FhirSettings(PlatformSettings):
    """What the FHIR API, the ImagingStudy sync and Subscription notifications read."""

    fhir_max_bundle_entries: int = setting("HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES", 1000, parse=integer(1, 100_000))
    """`HOUNSFIELD_FHIR_MAX_BUNDLE_ENTRIES`: a batch or transaction Bundle with more entries gets 413 (request
    bodies are also limited to 10 MB)."""
    fhir_sync_delay_seconds: float = setting("HOUNSFIELD_FHIR_SYNC_DELAY_MS", 1.0, parse=integer(0, 600_000, per=1000))
    """`HOUNSFIELD_FHIR_SYNC_DELAY_MS` (milliseconds, default 1000): a stored instance's ImagingStudy is brought up
    to date this long after it arrives, so that a burst of instances of one study makes one new version."""
    fhir_subscription_endpoints: tuple[str, ...] = setting(
        "HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS", (), parse=url_prefixes
    )
    """`HOUNSFIELD_FHIR_SUBSCRIPTION_ENDPOINTS`: comma-separated URL prefixes (`https://ehr.example.org/hooks/`)
    that a Subscription's rest-hook endpoint must start with (same scheme, host and port; whole path segments).
    Empty (the default): no Subscription can be created. The server calls only these (no request forgery)."""
    fhir_subscription_attempts: int = setting("HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS", 8, parse=integer(1, 20))
    """`HOUNSFIELD_FHIR_SUBSCRIPTION_ATTEMPTS`: delivery attempts of one notification (retried after 2, 4, 8 ...
    seconds) before the Subscription is set to `error`."""
