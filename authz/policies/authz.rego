# Hounsfield access policy: the one decision every request gets.
#
# Input (authz/decision.py PolicyInput.to_dict):
#   subject:  {sub, issuer, roles[], scopes[], patient, client_id, purpose_of_use[]}
#   action:   search | read | create | update | delete | export
#   resource: {kind, patient_id, study_uid, series_uid, instance_uid, modalities[], attributes?}
#   context:  {time, client_ip, break_glass: {id, reason, expires} | null, channel}
# Data (data.json beside this file, or HOUNSFIELD_POLICY_DATA):
#   care_lists {sub: [patient ids]}, research_opt_out [patient ids],
#   restricted_modalities {modality: [roles]}, break_glass_roles [roles]
#
# Output: data.hounsfield.authz.decision =
#   {"allow": bool, "reasons": [string], "obligations": {"audit": "standard"|"detailed", "break_glass"?: true},
#    "constraints": {"patient_ids"?: [..], "patient_ids_excluded"?: [..], "modalities_excluded"?: [..]}}
# Constraints are only given for collection actions (search, export) and must become SQL filters; an absent
# key means no such limit; "patient_ids": [] means nothing. No other constraint keys are ever produced.
#
# The decision is the conjunction of three layers:
#   1. roles grant (roles.rego): some role of the subject permits the action on the resource's kind, and that
#      role's patient limit holds (care list for `referring`, research consent for `researcher`);
#   2. modality restriction (this file): a modality listed in data.restricted_modalities is seen only by the
#      roles listed for it, whatever role grants the access;
#   3. scopes limit (scopes.rego): when the token carries SMART resource scopes they must also permit the
#      action, and a token whose permission comes from patient/ scopes only reaches its patient.
# Break-glass (below) lifts layers 1 and 2 for clinical reads and searches, never layer 3.
#
# Constant tables (role permissions, resource kind groups, scope letters) are in tables.rego; the unit tests
# are the case table in cases_test.rego.
package hounsfield.authz

import data.hounsfield.tables

default decision := {
	"allow": false,
	"reasons": ["policy produced no decision"],
	"obligations": {"audit": "detailed"},
	"constraints": {},
}

decision := {
	"allow": allow,
	"reasons": reasons,
	"obligations": obligations,
	"constraints": constraints,
}

# --- resource kinds and actions (groups in tables.rego) --------------------------------------------------------

kind := input.resource.kind

action := input.action

collection_action if action in tables.collection_actions

single_action if not collection_action

imaging_kind if tables.kind_group[kind] == "imaging"

patient_kind if tables.kind_group[kind] in tables.patient_groups

# The patient of the addressed resource, when the caller knows it (null or absent otherwise).
resource_patient := object.get(input.resource, "patient_id", null)

roles := {r | some r in input.subject.roles}

# A set (or array) as a sorted array. Not `sort(set)`: rego-cpp 1.5.2 returns a set from it, OPA an array.
# (Also for regopy: messages that embed a `concat` result are built with `concat`, not `sprintf`, whose `%s`
# of a concat result comes out quoted and breaks the output JSON in rego-cpp 1.5.2.)
sorted(s) := sort([x | some x in s])

# --- layer 2: modality restriction ----------------------------------------------------------------------------

default restricted_modalities := {}

restricted_modalities := data.restricted_modalities

# Modalities this subject may not see: none of its roles is listed for them.
excluded_modalities contains modality if {
	imaging_kind
	some modality, allowed in restricted_modalities
	count(roles & {r | some r in allowed}) == 0
}

modality_denials contains msg if {
	single_action
	some modality in input.resource.modalities
	modality in excluded_modalities
	msg := concat("", ["modality ", modality, " is restricted to roles ", concat(", ", sorted(restricted_modalities[modality]))])
}

modality_ok if count(modality_denials) == 0

# --- break-glass ----------------------------------------------------------------------------------------------
# The caller puts an open break-glass session of this subject in context.break_glass (null otherwise; expiry is
# the caller's business). A subject holding one of data.break_glass_roles may then read and search any clinical
# resource: care lists, consent and modality restrictions are lifted and every such access is flagged
# (obligations.break_glass, detailed audit). Scopes still limit: the client application was never granted more.

default break_glass_roles := []

break_glass_roles := data.break_glass_roles

break_glass_open if is_object(input.context.break_glass)

break_glass_eligible if {
	some r in break_glass_roles
	r in roles
}

break_glass_applies if {
	break_glass_open
	break_glass_eligible
	action in {"read", "search"}
	patient_kind
}

# --- the decision ---------------------------------------------------------------------------------------------

normal_allow if {
	role_ok
	modality_ok
	scope_ok
}

default allow := false

allow if normal_allow

allow if {
	break_glass_applies
	scope_ok
}

reasons := sorted(allow_reasons) if allow

reasons := sorted(deny_reasons) if not allow

allow_reasons contains sprintf("granted to role %s", [r]) if {
	not break_glass_applies
	some r in satisfied_roles
}

allow_reasons contains "break-glass" if break_glass_applies

# Break-glass lifted the role and modality limits: only what still stands is a reason.
specific_denials contains msg if {
	not break_glass_applies
	not role_ok
	some msg in role_denials
}

specific_denials contains msg if {
	not break_glass_applies
	some msg in modality_denials
}

specific_denials contains msg if some msg in scope_denials

# Never deny without saying why.
deny_reasons := specific_denials if {
	count(specific_denials) > 0
} else := {"denied by policy"}

default obligations := {"audit": "detailed"}

obligations := {"audit": "detailed", "break_glass": true} if {
	allow
	break_glass_applies
}

obligations := {"audit": "standard"} if {
	allow
	not break_glass_applies
}

default constraints := {}

constraints := object.union(patient_constraint, modality_constraint) if {
	allow
	collection_action
}

# Break-glass lifts the role limits on patients and modalities; a patient-context token stays at its patient.
default patient_constraint := {}

patient_constraint := {"patient_ids": sorted(limited_patients)} if scope_patient_limited

patient_constraint := {"patient_ids": sorted(care_list)} if {
	not scope_patient_limited
	not break_glass_applies
	role_patient_mode == "only"
}

patient_constraint := {"patient_ids_excluded": sorted(role_patients_excluded)} if {
	not scope_patient_limited
	not break_glass_applies
	role_patient_mode == "except"
	count(role_patients_excluded) > 0
}

# The token's patient, less what the roles would not let the subject see.
limited_patients := {input.subject.patient} if {
	break_glass_applies
} else := {input.subject.patient} if {
	role_patient_mode == "all"
} else := {input.subject.patient} & care_list if {
	role_patient_mode == "only"
} else := {input.subject.patient} - role_patients_excluded if {
	role_patient_mode == "except"
} else := set()

default modality_constraint := {}

modality_constraint := {"modalities_excluded": sorted(excluded_modalities)} if {
	not break_glass_applies
	count(excluded_modalities) > 0
}
