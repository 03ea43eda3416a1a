# Layer 1: what each role may do (the table is data.hounsfield.tables.role_permissions, tables.rego), and the
# patient limits some roles carry.
#
# A subject with several roles gets the union of what they grant: a read is allowed when any granting role's
# patient limit holds; a search is limited to the union of the patients each granting role may see.
package hounsfield.authz

import data.hounsfield.tables

# Starting a break-glass session (create BreakGlass) is decided by data.break_glass_roles, not by the table,
# and needs a free-text reason in resource.attributes.reason and the patient it is for in resource.patient_id
# (there is no break-glass for the whole archive).
break_glass_start if {
	kind == "BreakGlass"
	action == "create"
}

# Reviewing (closing) a break-glass session: resource.attributes.session_subject is the session's {sub, issuer}.
# Nobody reviews their own session, whatever their roles.
self_review if {
	kind == "BreakGlass"
	action == "update"
	owner := input.resource.attributes.session_subject
	owner.sub == input.subject.sub
	owner.issuer == input.subject.issuer
}

# A FHIR batch/transaction Bundle (create Bundle) is only an envelope: any role may send one, and every entry
# is then decided on its own as the request it stands for (fhir/routes_bundle.py).
bundle_envelope if {
	kind == "Bundle"
	action == "create"
}

granting_roles contains role if {
	not break_glass_start
	some role in roles
	action in tables.role_permissions[role][tables.kind_group[kind]]
}

granting_roles contains role if {
	bundle_envelope
	some role in roles
}

granting_roles contains "admin" if {
	not break_glass_start
	"admin" in roles
}

granting_roles contains role if {
	break_glass_start
	some role in break_glass_roles
	role in roles
}

# --- patient limits (patient kinds only) ----------------------------------------------------------------------

default care_lists := {}

care_lists := data.care_lists

default research_opt_out := []

research_opt_out := data.research_opt_out

care_list := {p | some p in object.get(care_lists, input.subject.sub, [])}

opt_out := {p | some p in research_opt_out}

# Does `role`'s patient limit let it reach this one resource?
patient_allowed(role) if not role in tables.limited_roles

patient_allowed(role) if not patient_kind

patient_allowed("referring") if resource_patient in care_list

patient_allowed("researcher") if not resource_patient in opt_out

# Granting roles whose limits hold for this resource (single actions) or that grant at all (collections).
satisfied_roles contains role if {
	single_action
	some role in granting_roles
	patient_allowed(role)
}

satisfied_roles contains role if {
	collection_action
	some role in granting_roles
}

break_glass_reason_given if {
	is_string(input.resource.attributes.reason)
	trim_space(input.resource.attributes.reason) != ""
}

break_glass_patient_named if {
	is_string(resource_patient)
	resource_patient != ""
}

# An on-demand inference run that overrides the model's input selector (resource.attributes.override_selector):
# running a model on a series it was not made for is a model-registry decision, admins only.
selector_override if {
	kind == "InferenceRequest"
	action == "create"
	input.resource.attributes.override_selector == true
}

selector_override_ok if not selector_override

selector_override_ok if "admin" in roles

role_request_ok if {
	not break_glass_start
	not self_review
	selector_override_ok
}

role_request_ok if {
	break_glass_start
	break_glass_reason_given
	break_glass_patient_named
}

role_ok if {
	count(satisfied_roles) > 0
	role_request_ok
}

role_denials contains msg if {
	count(roles) == 0
	msg := "the subject has no role"
}

role_denials contains msg if {
	count(roles) > 0
	count(granting_roles) == 0
	not break_glass_start
	msg := concat("", ["no role of ", concat(", ", sorted(roles)), " may ", action, " ", kind])
}

role_denials contains msg if {
	count(roles) > 0
	count(granting_roles) == 0
	break_glass_start
	msg := concat("", ["no role of ", concat(", ", sorted(roles)), " may break the glass"])
}

role_denials contains "breaking the glass needs a reason" if {
	break_glass_start
	not break_glass_reason_given
}

role_denials contains "breaking the glass needs a patient" if {
	break_glass_start
	not break_glass_patient_named
}

role_denials contains "the subject of a break-glass session may not review it" if self_review

role_denials contains "overriding a model's input selector needs the admin role" if not selector_override_ok

role_denials contains msg if {
	single_action
	patient_kind
	"referring" in granting_roles
	not resource_patient in care_list
	msg := sprintf("patient %v is not in the care list of %s", [resource_patient, input.subject.sub])
}

role_denials contains msg if {
	single_action
	patient_kind
	"researcher" in granting_roles
	resource_patient in opt_out
	msg := sprintf("patient %v opted out of research use", [resource_patient])
}

# --- the union of the granting roles' patient limits, for collections ------------------------------------------
# One of: "all" (some granting role has no patient limit, or the kind has no patient), "only" (the care list:
# referring alone), "except" (all but the opted-out patients: researcher, less the care list when also
# referring), "none" (no role grants the action).

role_patients_unlimited if not patient_kind

role_patients_unlimited if {
	some role in granting_roles
	not role in tables.limited_roles
}

role_patient_mode := "all" if {
	role_patients_unlimited
} else := "except" if {
	"researcher" in granting_roles
} else := "only" if {
	"referring" in granting_roles
} else := "none"

role_patients_excluded := opt_out - care_list if "referring" in granting_roles

role_patients_excluded := opt_out if not "referring" in granting_roles
