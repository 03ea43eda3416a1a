"""The authorization matrix's oracle: an independent Python model of who may see which patient's data, written
from the documented access semantics (README "Authorization" and "Break-glass", the role table of
authz/policies/tables.rego), never by asking the policy engine. The matrix compares every response with it.

The model: roles grant by resource group; `referring` is limited to its care list and `researcher` to patients
who did not opt out; imaging of a restricted modality (MG) is seen only by the roles listed for it; SMART scopes
limit, and a `patient` claim binds the token to that patient unless a `user/` or `system/` scope covers the
action; an open break-glass session of a subject holding a break-glass role lifts care lists, consent and
modality limits for the session's patient only (never the binding of a patient-context token).

Resource groups are the policy's (`imaging`, `report`, `patient`, `inference` hold one patient's data; `endpoint`,
`model`, `audit`, `break_glass`, `subscription`, `system` do not). A disclosure is (group, patient, study): the
study matters only for imaging, where restricted modalities apply per study.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RS = ("search", "read")

ROLE_GRANTS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "radiologist": {
        "imaging": RS,
        "report": (*RS, "create", "update"),
        "patient": RS,
        "endpoint": RS,
        "model": RS,
        "inference": (*RS, "create"),
    },
    "referring": {"imaging": RS, "report": RS, "patient": RS, "endpoint": RS},
    "technologist": {"imaging": (*RS, "create"), "patient": RS, "endpoint": RS},
    "ai-service": {
        "imaging": (*RS, "create"),
        "report": ("create",),
        "endpoint": RS,
        "model": RS,
        "inference": RS,
    },
    "auditor": {"audit": (*RS, "export"), "break_glass": (*RS, "update")},
    "researcher": {"imaging": RS, "report": RS, "endpoint": RS},
    "ehr": {
        "imaging": RS,
        "report": RS,
        "patient": RS,
        "endpoint": RS,
        "subscription": (*RS, "create", "update", "delete"),
    },
}
"""What each role may do, by resource group; `admin` may do everything."""

KIND_GROUP: Mapping[str, str] = {
    **{k: "imaging" for k in ("study", "series", "instance", "frames", "bulkdata", "metadata", "rendered")},
    "ImagingStudy": "imaging",
    "DiagnosticReport": "report",
    "Patient": "patient",
    "Endpoint": "endpoint",
    "Subscription": "subscription",
    "AuditEvent": "audit",
    "BreakGlass": "break_glass",
    "system": "system",
    "Model": "model",
    "InferenceRequest": "inference",
    "Bundle": "bundle",
}
"""The group of each resource kind a route declares (`authz_opt(action, kind)`)."""

PATIENT_GROUPS = frozenset({"imaging", "report", "patient", "inference"})
"""Groups whose resources belong to one patient: care lists, consent and patient context limit them."""

SMART_TYPE: Mapping[str, str] = {
    "imaging": "ImagingStudy",
    "report": "DiagnosticReport",
    "patient": "Patient",
    "endpoint": "Endpoint",
    "subscription": "Subscription",
    "audit": "AuditEvent",
    "break_glass": "BreakGlass",
    "model": "Model",
    "inference": "InferenceRequest",
    "system": "system",
}
"""The SMART resource type a scope names for each group (DICOMweb resources are `ImagingStudy`)."""

SCOPE_LETTERS = {"search": "s", "read": "r", "create": "c", "update": "u", "delete": "d", "export": "rs"}

CARE_LISTS: Mapping[str, frozenset[str]] = {
    "dr-who": frozenset({"P1", "P2"}),
    "dr-house": frozenset({"P2", "P4"}),
}
RESEARCH_OPT_OUT = frozenset({"P3"})
RESTRICTED_MODALITIES: Mapping[str, frozenset[str]] = {"MG": frozenset({"radiologist", "admin"})}
"""Imaging of these modalities is seen only by the roles listed (whatever role grants the access)."""
BREAK_GLASS_ROLES = frozenset({"referring", "radiologist"})


def policy_data() -> dict[str, object]:
    """The policy data the matrix's server runs with (HOUNSFIELD_POLICY_DATA): the model's own tables, so that
    the shipped example data may change without changing what the matrix expects."""
    return {
        "care_lists": {sub: sorted(patients) for sub, patients in CARE_LISTS.items()},
        "research_opt_out": sorted(RESEARCH_OPT_OUT),
        "restricted_modalities": {m: sorted(roles) for m, roles in RESTRICTED_MODALITIES.items()},
        "break_glass_roles": sorted(BREAK_GLASS_ROLES),
    }


@dataclass(frozen=True)
class Identity:
    """One row of the matrix: a token's claims, and the break-glass session its subject holds (the patient)."""

    name: str
    sub: str
    roles: tuple[str, ...]
    scopes: tuple[str, ...] = ()
    patient: str | None = None
    break_glass: str | None = None
    """The patient of the subject's open break-glass session (started through POST /break-glass)."""

    def claims(self) -> dict[str, object]:
        """Keyword arguments of `authz.tokens.issue_token`."""
        claims: dict[str, object] = {"sub": self.sub, "roles": list(self.roles), "scopes": list(self.scopes)}
        if self.patient is not None:
            claims["patient"] = self.patient
        return claims


ADMIN_SCOPES = ("system/*.cruds", "user/*.cruds")
IDENTITIES: tuple[Identity, ...] = (
    Identity("radiologist", "rad-1", ("radiologist",)),
    Identity("referring dr-who", "dr-who", ("referring",)),
    Identity("technologist", "tech-1", ("technologist",)),
    Identity("ai-service", "ai-1", ("ai-service",)),
    Identity("auditor", "sec-1", ("auditor",)),
    Identity("researcher", "res-1", ("researcher",)),
    Identity("ehr", "ehr-1", ("ehr",)),
    Identity("admin", "admin-1", ("admin",), ADMIN_SCOPES),
    Identity("radiologist patient=P1 no scopes", "app-1", ("radiologist",), (), "P1"),
    Identity("radiologist patient=P1 patient/*.rs", "app-2", ("radiologist",), ("patient/*.rs",), "P1"),
    Identity("radiologist patient=P1 user/*.rs", "app-3", ("radiologist",), ("user/*.rs",), "P1"),
    Identity("ehr patient=P4 patient/*.rs", "app-4", ("ehr",), ("patient/*.rs",), "P4"),
    Identity("referring dr-house break-glass P5", "dr-house", ("referring",), (), None, "P5"),
    Identity("dr-house patient=P4 (break-glass P5 open)", "dr-house", ("referring",), (), "P4", "P5"),
)
"""Every role of tables.rego, patient-context tokens with and without scopes, and a break-glass subject (the
session is its subject's: the last two rows share one, the second bound to another patient by its token)."""

BREAK_GLASS_SUBJECTS = {i.sub: i.break_glass for i in IDENTITIES if i.break_glass is not None}


# --- the model ---------------------------------------------------------------------------------------------


def _scopes(identity: Identity) -> list[tuple[str, str, str]]:
    """(context, type, letters) of the SMART resource scopes (`patient/*.rs`)."""
    parsed = []
    for scope in identity.scopes:
        context, slash, rest = scope.partition("/")
        if not slash or context not in ("patient", "user", "system"):
            continue
        rtype, _, perms = rest.partition(".")
        letters = {"*": "cruds", "read": "rs", "write": "cud"}.get(perms, perms)
        parsed.append((context, rtype, letters))
    return parsed


def _covering(identity: Identity, group: str, action: str) -> list[str]:
    """Contexts of the scopes that permit `action` on the group's type."""
    need = SCOPE_LETTERS[action]
    rtype = SMART_TYPE.get(group, group)
    return [c for c, t, letters in _scopes(identity) if t in ("*", rtype) and all(x in letters for x in need)]


def scopes_permit(identity: Identity, group: str, action: str) -> bool:
    """Roles grant, scopes limit: without SMART resource scopes the roles are the whole grant."""
    return not _scopes(identity) or bool(_covering(identity, group, action))


def bound_patient(identity: Identity, group: str, action: str) -> str | None:
    """The patient a token is bound to: a patient claim binds unless a user/ or system/ scope covers the action."""
    if not identity.patient or group not in PATIENT_GROUPS:
        return None
    broad = any(c in ("user", "system") for c in _covering(identity, group, action))
    return None if broad else identity.patient


def _granting(identity: Identity, group: str, action: str) -> list[str]:
    roles = [r for r in identity.roles if action in ROLE_GRANTS.get(r, {}).get(group, ())]
    return [*roles, "admin"] if "admin" in identity.roles else roles


def _patient_limit(role: str, sub: str, patient: str) -> bool:
    if role == "referring":
        return patient in CARE_LISTS.get(sub, frozenset())
    if role == "researcher":
        return patient not in RESEARCH_OPT_OUT
    return True


def allows(identity: Identity, group: str, action: str, patient: str | None, modality: str | None = None) -> bool:
    """May `identity` do `action` on a resource of `group` belonging to `patient` (imaging: of `modality`)?"""
    if group == "bundle":
        return True  # the envelope; every entry is its own question
    if not scopes_permit(identity, group, action):
        return False
    if group not in PATIENT_GROUPS or patient is None:
        return bool(_granting(identity, group, action))
    bound = bound_patient(identity, group, action)
    if bound is not None and patient != bound:
        return False
    if identity.break_glass == patient and action in RS and BREAK_GLASS_ROLES & set(identity.roles):
        return True  # the session lifts care lists, consent and modality limits for its patient only
    if not any(_patient_limit(r, identity.sub, patient) for r in _granting(identity, group, action)):
        return False
    if group == "imaging" and modality in RESTRICTED_MODALITIES:
        return bool(RESTRICTED_MODALITIES[modality] & set(identity.roles))
    return True
