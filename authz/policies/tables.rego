# Constant tables of the policy. They must not read `input` or other data: the in-process engine evaluates
# this package once when it compiles the policy and loads the value as data (rego-cpp would otherwise build
# these objects again for every decision); OPA evaluates it as any other module. Hence JSON shapes only
# (arrays, not sets).
#
# What each role may do, by resource group:
#   radiologist   search/read all imaging; reads and writes reports; no delete
#   referring     search/read imaging and reports of the patients in its care list (data.care_lists[sub])
#   technologist  stores (create) imaging; search/read for quality control
#   ai-service    reads its inputs, creates results (DICOM SR/SEG and DiagnosticReports)
#   auditor       the audit trail and break-glass review only: never images or reports
#   researcher    search/read imaging and reports, except patients who opted out (data.research_opt_out)
#   ehr           an EHR or integration engine (a system client): search/read imaging, reports, patients and
#                 endpoints, and manage FHIR Subscriptions (whose notifications then need its read permission)
#   (AI models: the registry (`Model`) is read by radiologists and the AI service and changed by admins only;
#   radiologists request on-demand runs (`InferenceRequest`) and read their status)
#   admin         everything (except breaking the glass, which only data.break_glass_roles may)
#
# A subject with several roles gets the union of what they grant: a read is allowed when any granting role's
# patient limit holds; a search is limited to the union of the patients each granting role may see.
package hounsfield.tables

role_permissions := {
	"radiologist": {
		"imaging": ["search", "read"],
		"report": ["search", "read", "create", "update"],
		"patient": ["search", "read"],
		"endpoint": ["search", "read"],
		"model": ["search", "read"],
		"inference": ["search", "read", "create"],
	},
	"referring": {
		"imaging": ["search", "read"],
		"report": ["search", "read"],
		"patient": ["search", "read"],
		"endpoint": ["search", "read"],
	},
	"technologist": {
		"imaging": ["search", "read", "create"],
		"patient": ["search", "read"],
		"endpoint": ["search", "read"],
	},
	"ai-service": {
		"imaging": ["search", "read", "create"],
		"report": ["create"],
		"endpoint": ["search", "read"],
		"model": ["search", "read"],
		"inference": ["search", "read"],
	},
	"auditor": {
		"audit": ["search", "read", "export"],
		"break_glass": ["search", "read", "update"],
	},
	"researcher": {
		"imaging": ["search", "read"],
		"report": ["search", "read"],
		"endpoint": ["search", "read"],
	},
	"ehr": {
		"imaging": ["search", "read"],
		"report": ["search", "read"],
		"patient": ["search", "read"],
		"endpoint": ["search", "read"],
		"subscription": ["search", "read", "create", "update", "delete"],
	},
}

# DICOMweb resources (and their FHIR face, ImagingStudy) are the `imaging` group; SMART scopes name them
# `ImagingStudy`.
kind_group := {
	"study": "imaging",
	"series": "imaging",
	"instance": "imaging",
	"frames": "imaging",
	"bulkdata": "imaging",
	"metadata": "imaging",
	"rendered": "imaging",
	"ImagingStudy": "imaging",
	"DiagnosticReport": "report",
	"Patient": "patient",
	"Endpoint": "endpoint",
	"Subscription": "subscription",
	"Bundle": "bundle",
	"AuditEvent": "audit",
	"BreakGlass": "break_glass",
	"system": "system",
	"Model": "model",
	"InferenceRequest": "inference",
}

# Groups whose resources belong to one patient: patient limits (care lists, consent, patient-context tokens)
# apply to them. An inference request is a run on one patient's study (the request and result routes give the
# policy that study's patient).
patient_groups := ["imaging", "report", "patient", "inference"]

# Actions on collections: limits become constraints instead of a yes/no on one resource.
collection_actions := ["search", "export"]

# Roles whose access to patient data is limited (care list, research consent).
limited_roles := ["referring", "researcher"]

# SMART scope permissions each action needs.
action_perms := {
	"search": ["s"],
	"read": ["r"],
	"create": ["c"],
	"update": ["u"],
	"delete": ["d"],
	"export": ["r", "s"],
}
