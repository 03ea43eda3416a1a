# Hounsfield access policy: the one decision every request gets.
#
# Input (authz/decision.py PolicyInput.to_dict):
#   subject:  {sub, issuer, roles[], scopes[], patient, client_id, purpose_of_use[]}
#   action:   search | read | create | update | delete | export
#   resource: {kind, patient_id, study_uid, series_uid, instance_uid, modalities[], attributes?}
#   context:  {time, client_ip, break_glass: {id, reason, expires, patient_id, study_uid} | null, channel}
# Data (data.json beside this file, or HOUNSFIELD_POLICY_DATA):
#   care_lists {sub: [patient ids]}, research_opt_out [patient ids],
#   restricted_modalities {modality: [roles]}, break_glass_roles [roles]
#
# Output: data.hounsfield.authz.decision =
#   {"allow": bool, "reasons": [string], "obligations": {"audit": "standard"|"detailed", "break_glass"?: true},
#    "constraints": {"patient_ids"?: [..], "patient_ids_excluded"?: [..], "modalities_excluded"?: [..],
#                    "granted"?: {"patient_id": id, "study_uid"?: uid}}}
# Constraints are only given for collection actions (search, export) and must become SQL filters; an absent
# key means no such limit; "patient_ids": [] means nothing. A row is visible when it passes every one of the
# first three, OR when it belongs to the patient (and study, when given) of "granted" (a break-glass session).
# No other constraint keys are ever produced.
#
# The decision is the conjunction of three layers:
#   1. roles grant (roles.rego): some role of the subject permits the action on the resource's kind, and that
#      role's patient limit holds (care list for `referring`, research consent for `researcher`);
#   2. modality restriction (this file): a modality listed in data.restricted_modalities is seen only by the
#      roles listed for it, whatever role grants the access;
#   3. scopes limit (scopes.rego): when the token carries SMART resource scopes they must also permit the
#      action, and a token with a patient claim reaches only that patient unless a `user/` or `system/` scope
#      covers the action.
# Break-glass (below) lifts layers 1 and 2 for reads and searches of the session's patient only, never layer 3.
#
# Constant tables (role permissions, resource kind groups, scope letters) are in tables.rego; the unit tests
# are the case table in cases_test.rego.
package hounsfield.authz

import data.hounsfield.tables

# What a decision depends on: the subject, the action, the resource's kind, its study's facts (patient,
# modalities, attributes) and the context, never the series or instance UID. The server's decision cache may then
# answer another series or instance of the same study with one decision. A policy that reads
# input.resource.series_uid or input.resource.instance_uid must say "instance" (or leave this rule out).
decision_scope := "study"

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

# --- break-glass ---------------------------------------------------------------------------------------------
# The caller puts an open break-glass session of this subject in context.break_glass (null otherwise; expiry is
# the caller's business): {id, reason, expires, patient_id, study_uid}. A session names one patient, and maybe
# one study of that patient; one without a patient grants nothing. For a subject holding one of
# data.break_glass_roles the session lifts care lists, consent and modality restrictions for that patient only:
#   - reads of the patient's resources (patient groups) are allowed; when the session names a study, only that
#     study's (a resource tied to no study, such as a report or the Patient, stays allowed);
#   - searches return what the roles normally allow plus every row of the patient (of the study): the
#     constraint "granted" (below).
# Nothing about any other patient changes. Scopes still limit (the client application was never granted more),
# and a token bound to one patient (scopes.rego) breaks the glass for that patient only. Every access that only
# the session allows is flagged (obligations.break_glass, detailed audit).

default break_glass_roles := []

break_glass_roles := data.break_glass_roles

break_glass_open if is_object(input.context.break_glass)

break_glass_eligible if {
	some r in break_glass_roles
	r in roles
}

# The session's patient and study (undefined when the session names none).
break_glass_patient := p if {
	break_glass_open
	p := object.get(input.context.break_glass, "patient_id", null)
	is_string(p)
	p != ""
}

break_glass_study := s if {
	break_glass_open
	s := object.get(input.context.break_glass, "study_uid", null)
	is_string(s)
	s != ""
}

# The session may lift limits for this subject, action and kind.
break_glass_grants if {
	is_string(break_glass_patient)
	break_glass_eligible
	action in {"read", "search"}
	patient_kind
	break_glass_within_binding
}

break_glass_within_binding if not patient_bound

break_glass_within_binding if break_glass_patient == input.subject.patient

resource_study := object.get(input.resource, "study_uid", null)

break_glass_study_ok if not break_glass_study

break_glass_study_ok if resource_study == null

break_glass_study_ok if resource_study == break_glass_study

# A read of the session's patient (and study).
break_glass_read if {
	break_glass_grants
	single_action
	resource_patient == break_glass_patient
	break_glass_study_ok
}

# A search during the session: its rows of the session's patient (study) are added to the normal ones.
break_glass_search if {
	break_glass_grants
	collection_action
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
	break_glass_read
	scope_ok
}

allow if {
	break_glass_search
	scope_ok
}

# What only the session allows: a read the normal layers deny, any search during the session.
break_glass_used if {
	allow
	break_glass_read
	not normal_allow
}

break_glass_used if {
	allow
	break_glass_search
}

reasons := sorted(allow_reasons) if allow

reasons := sorted(deny_reasons) if not allow

allow_reasons contains sprintf("granted to role %s", [r]) if {
	normal_allow
	some r in satisfied_roles
}

allow_reasons contains "break-glass" if break_glass_used

specific_denials contains msg if {
	not role_ok
	some msg in role_denials
}

specific_denials contains msg if some msg in modality_denials

specific_denials contains msg if some msg in scope_denials

# Never deny without saying why.
deny_reasons := specific_denials if {
	count(specific_denials) > 0
} else := {"denied by policy"}

default obligations := {"audit": "detailed"}

obligations := {"audit": "detailed", "break_glass": true} if break_glass_used

obligations := {"audit": "standard"} if {
	allow
	not break_glass_used
}

default constraints := {}

constraints := object.union(object.union(patient_constraint, modality_constraint), grant_constraint) if {
	allow
	collection_action
}

# A patient-context token stays at its patient (less what its roles would not let the subject see).
default patient_constraint := {}

patient_constraint := {"patient_ids": sorted(limited_patients)} if scope_patient_limited

patient_constraint := {"patient_ids": sorted(care_list)} if {
	not scope_patient_limited
	role_patient_mode == "only"
}

patient_constraint := {"patient_ids_excluded": sorted(role_patients_excluded)} if {
	not scope_patient_limited
	role_patient_mode == "except"
	count(role_patients_excluded) > 0
}

# No role grants the search (only a break-glass session lets it through): nothing but the granted rows.
patient_constraint := {"patient_ids": []} if {
	not scope_patient_limited
	role_patient_mode == "none"
}

# The token's patient, less what the roles would not let the subject see.
limited_patients := {input.subject.patient} if {
	role_patient_mode == "all"
} else := {input.subject.patient} & care_list if {
	role_patient_mode == "only"
} else := {input.subject.patient} - role_patients_excluded if {
	role_patient_mode == "except"
} else := set()

default modality_constraint := {}

modality_constraint := {"modalities_excluded": sorted(excluded_modalities)} if count(excluded_modalities) > 0

# Rows of the session's patient (and study) are visible whatever the other constraints say.
default grant_constraint := {}

grant_constraint := {"granted": {"patient_id": break_glass_patient, "study_uid": break_glass_study}} if {
	break_glass_search
	is_string(break_glass_study)
}

grant_constraint := {"granted": {"patient_id": break_glass_patient}} if {
	break_glass_search
	not break_glass_study
}
