# Layer 3: SMART on FHIR scopes limit what the token's client application may do.
#
# Scopes follow SMART App Launch v2 (scopes-and-launch-context): `<patient|user|system>/<Type|*>.<cruds>`,
# e.g. `patient/ImagingStudy.rs`, `user/*.cruds`, `system/DiagnosticReport.c`; the v1 forms `.read` (= rs),
# `.write` (= cud) and `.*` are understood too. DICOMweb resources (study, series, instance, frames, metadata,
# bulkdata, rendered) are `ImagingStudy`, as in the SMART imaging-access pattern. Actions need: search `s`,
# read `r`, create `c`, update `u`, delete `d`, export `r` and `s`.
#
# Roles grant, scopes limit: when the token carries SMART resource scopes (any scope starting with `patient/`,
# `user/` or `system/`), one of them must also permit the action on the resource type. A token with no SMART
# resource scopes (none at all, or only `openid`, `profile`, `launch/patient`, ...) relies on its roles (and its
# patient claim, below): such tokens come from our own issuer or from an identity provider that does not speak
# SMART, where the roles are the whole grant. A resource scope we do not understand (e.g. one with v2 query parameters,
# `patient/Observation.rs?category=...`) permits nothing but still switches scope checking on: fail closed.
#
# Patient context: a token whose `patient` claim is a non-empty string is bound to that patient, whatever its
# roles, unless a `user/` or `system/` scope covers the action on the type (SMART's EHR launch: the patient is
# only launch context for a user whose own grant is broader). A bound token reaches only its patient's data
# (patient groups): searches get constraints.patient_ids = [that patient] (less what the roles would not let the
# subject see); reads, writes and break-glass starts for any other patient, or for no known patient, are denied.
# So: no scopes + patient claim -> bound; `patient/` scopes only -> bound; `user/*.rs` + patient claim -> not
# bound for what that scope covers. A `patient/` scope without a patient context permits nothing.
package hounsfield.authz

import data.hounsfield.tables

smart_mode if {
	some raw in input.subject.scopes
	regex.match(`^(patient|user|system)/`, raw)
}

parsed_scopes contains {"context": m[1], "type": m[2], "perms": scope_perms(m[3])} if {
	some raw in input.subject.scopes
	matches := regex.find_all_string_submatch_n(`^(patient|user|system)/([A-Za-z]+|\*)\.(\*|read|write|c?r?u?d?s?)$`, raw, 1)
	count(matches) == 1
	m := matches[0]
	m[3] != ""
}

scope_perms(p) := {"c", "r", "u", "d", "s"} if {
	p == "*"
} else := {"r", "s"} if {
	p == "read"
} else := {"c", "u", "d"} if {
	p == "write"
} else := {c | some c in split(p, "")}

scope_type := "ImagingStudy" if imaging_kind else := kind

covering_scopes contains s if {
	some s in parsed_scopes
	s.type in {"*", scope_type}
	every p in tables.action_perms[action] {
		p in s.perms
	}
}

broad_cover if {
	some s in covering_scopes
	s.context in {"user", "system"}
}

patient_cover if {
	some s in covering_scopes
	s.context == "patient"
}

has_patient_context if {
	is_string(input.subject.patient)
	input.subject.patient != ""
}

# The patient claim binds unless a user/ or system/ scope covers the action.
patient_bound if {
	has_patient_context
	not broad_cover
}

scope_patient_limited if {
	patient_bound
	patient_kind
	collection_action
}

# Requests about one patient's data: a bound token must name its own patient.
patient_addressed if {
	patient_kind
	single_action
}

patient_addressed if break_glass_start

patient_reach_ok if not patient_bound

patient_reach_ok if not patient_addressed

patient_reach_ok if resource_patient == input.subject.patient

# The scopes permit the action at all (before the patient binding).
scope_grants if not smart_mode

scope_grants if broad_cover

scope_grants if bundle_envelope

scope_grants if {
	patient_cover
	has_patient_context
}

default scope_ok := false

scope_ok if {
	scope_grants
	patient_reach_ok
}

scope_denials contains msg if {
	smart_mode
	not bundle_envelope
	not broad_cover
	not patient_cover
	msg := sprintf("token scopes do not permit %s on %s", [action, scope_type])
}

scope_denials contains "patient scopes need a patient context" if {
	smart_mode
	not bundle_envelope
	not broad_cover
	patient_cover
	not has_patient_context
}

scope_denials contains msg if {
	not patient_reach_ok
	msg := sprintf("patient %v is outside the token's patient context", [resource_patient])
}
