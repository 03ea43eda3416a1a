# Unit tests of the shipped policy, as a table of cases: each gives an input and the decision expected under the
# fixture data below (not data.json, so that editing the shipped data breaks no test).
#
# `make test` runs every case through the in-process engine (tests/test_policies.py: regopy, the production
# path: compiled once, input set per decision) and evaluates the `test_*` rules of this file; `opa test
# authz/policies` runs the same cases through OPA (opa_test.rego). The cases are data rather than one `test_*`
# rule each with `with input as ...` because rego-cpp 1.5.2 cannot take `with input as` (it crashes, and
# compiles `with` slowly); see tests/test_policies.py.
#
# A case: {"input": ..., "allow": bool} and optionally the exact "reasons", "constraints" and "obligations".
package hounsfield.authz_test

import data.hounsfield.authz

fixture_data := {
	"care_lists": {"dr-who": ["P1", "P2"], "dr-house": ["P2", "P4"]},
	"research_opt_out": ["P3"],
	"restricted_modalities": {"MG": ["radiologist", "admin"]},
	"break_glass_roles": ["referring", "radiologist"],
}

req(roles, act, kind, patient) := {
	"subject": {
		"sub": "dr-who",
		"issuer": "test",
		"roles": roles,
		"scopes": [],
		"patient": null,
		"client_id": null,
		"purpose_of_use": [],
	},
	"action": act,
	"resource": {
		"kind": kind,
		"patient_id": patient,
		"study_uid": "1.2.3",
		"series_uid": null,
		"instance_uid": null,
		"modalities": ["CT"],
	},
	"context": {"time": "2026-01-01T00:00:00.000Z", "client_ip": "127.0.0.1", "break_glass": null, "channel": "http"},
}

# Merges are spelled out one level deep: rego-cpp's object.union does not merge nested objects.
as_sub(inp, sub) := object.union(inp, {"subject": object.union(inp.subject, {"sub": sub})})

scoped(inp, scopes, patient) := object.union(inp, {"subject": object.union(inp.subject, {"scopes": scopes, "patient": patient})})

modalities(inp, m) := object.union(inp, {"resource": object.union(inp.resource, {"modalities": m})})

attributes(inp, a) := object.union(inp, {"resource": object.union(inp.resource, {"attributes": a})})

# An open break-glass session for `patient` (and `study`, when not null).
glass_for(inp, patient, study) := object.union(inp, {"context": object.union(inp.context, {"break_glass": {
	"id": "bg-1",
	"reason": "patient unconscious in ED",
	"expires": "2026-01-01T01:00:00Z",
	"patient_id": patient,
	"study_uid": study,
}})})

glass(inp, patient) := glass_for(inp, patient, null)

study_of(inp, uid) := object.union(inp, {"resource": object.union(inp.resource, {"study_uid": uid})})

reviewing(inp, sub, issuer) := attributes(inp, {"session_subject": {"sub": sub, "issuer": issuer}})

standard := {"audit": "standard"}

flagged := {"audit": "detailed", "break_glass": true}

cases := {
	# --- radiologist ---
	"radiologist_reads_any_patient": {
		"input": req(["radiologist"], "read", "frames", "P9"),
		"allow": true, "reasons": ["granted to role radiologist"], "obligations": standard, "constraints": {},
	},
	"radiologist_searches_unconstrained": {
		"input": req(["radiologist"], "search", "study", null),
		"allow": true, "constraints": {},
	},
	"radiologist_reads_mammography": {"input": modalities(req(["radiologist"], "read", "study", "P9"), ["MG"]), "allow": true},
	"radiologist_cannot_delete": {
		"input": req(["radiologist"], "delete", "study", "P1"),
		"allow": false, "reasons": ["no role of radiologist may delete study"],
	},
	"radiologist_writes_reports": {"input": req(["radiologist"], "create", "DiagnosticReport", "P1"), "allow": true},
	# --- referring clinician ---
	"referring_reads_care_list_patient": {"input": req(["referring"], "read", "series", "P2"), "allow": true},
	"referring_denied_outside_care_list": {
		"input": req(["referring"], "read", "series", "P9"),
		"allow": false, "reasons": ["patient P9 is not in the care list of dr-who"],
	},
	"referring_denied_unknown_patient": {"input": req(["referring"], "read", "study", null), "allow": false},
	"referring_search_constrained_to_care_list": {
		"input": req(["referring"], "search", "study", null),
		"allow": true, "constraints": {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"]},
		"obligations": standard,
	},
	"referring_without_care_list_sees_nothing": {
		"input": as_sub(req(["referring"], "search", "instance", null), "dr-nobody"),
		"allow": true, "constraints": {"patient_ids": [], "modalities_excluded": ["MG"]},
	},
	"referring_cannot_store": {
		"input": req(["referring"], "create", "study", "P1"),
		"allow": false, "reasons": ["no role of referring may create study"],
	},
	"referring_denied_mammography_of_own_patient": {
		"input": modalities(req(["referring"], "read", "study", "P1"), ["MG", "CT"]),
		"allow": false, "reasons": ["modality MG is restricted to roles admin, radiologist"],
	},
	# --- technologist ---
	"technologist_stores": {"input": req(["technologist"], "create", "study", "P1"), "allow": true},
	"technologist_reads_for_qc": {"input": req(["technologist"], "read", "instance", "P9"), "allow": true},
	"technologist_cannot_delete": {"input": req(["technologist"], "delete", "series", "P1"), "allow": false},
	"technologist_cannot_read_mammography": {
		"input": modalities(req(["technologist"], "read", "study", "P1"), ["CT", "MG"]),
		"allow": false, "reasons": ["modality MG is restricted to roles admin, radiologist"],
	},
	"technologist_search_excludes_mammography": {
		"input": req(["technologist"], "search", "series", null),
		"allow": true, "constraints": {"modalities_excluded": ["MG"]},
	},
	# --- AI service ---
	"ai_service_reads_inputs": {"input": req(["ai-service"], "read", "frames", "P1"), "allow": true},
	"ai_service_stores_results": {"input": req(["ai-service"], "create", "study", "P1"), "allow": true},
	"ai_service_creates_reports": {"input": req(["ai-service"], "create", "DiagnosticReport", "P1"), "allow": true},
	"ai_service_cannot_update_reports": {"input": req(["ai-service"], "update", "DiagnosticReport", "P1"), "allow": false},
	# --- the AI model registry and inference requests (inference/) ---
	"admin_registers_models": {"input": req(["admin"], "create", "Model", null), "allow": true},
	"admin_promotes_models": {"input": req(["admin"], "update", "Model", null), "allow": true},
	"referring_cannot_register_models": {"input": req(["referring"], "create", "Model", null), "allow": false},
	"referring_cannot_list_models": {"input": req(["referring"], "search", "Model", null), "allow": false},
	"radiologist_lists_models": {"input": req(["radiologist"], "search", "Model", null), "allow": true},
	"radiologist_cannot_promote_models": {"input": req(["radiologist"], "update", "Model", null), "allow": false},
	"radiologist_requests_inference": {"input": req(["radiologist"], "create", "InferenceRequest", null), "allow": true},
	"ai_service_reads_models": {"input": req(["ai-service"], "read", "Model", null), "allow": true},
	"ai_service_cannot_register_models": {"input": req(["ai-service"], "create", "Model", null), "allow": false},
	"admin_overrides_model_selector": {
		"input": attributes(req(["admin"], "create", "InferenceRequest", "P1"), {"override_selector": true}),
		"allow": true,
	},
	"radiologist_cannot_override_model_selector": {
		"input": attributes(req(["radiologist"], "create", "InferenceRequest", "P1"), {"override_selector": true}),
		"allow": false,
	},
	"technologist_cannot_request_inference": {"input": req(["technologist"], "create", "InferenceRequest", null), "allow": false},
	"patient_token_requests_inference_on_its_patient": {
		"input": scoped(req(["radiologist"], "create", "InferenceRequest", "P7"), ["patient/*.cruds"], "P7"),
		"allow": true,
	},
	"patient_token_cannot_request_inference_on_another_patient": {
		"input": scoped(req(["radiologist"], "create", "InferenceRequest", "P8"), ["patient/*.cruds"], "P7"),
		"allow": false,
	},
	"patient_token_cannot_read_another_patients_inference_request": {
		"input": scoped(req(["radiologist"], "read", "InferenceRequest", "P8"), ["patient/*.cruds"], "P7"),
		"allow": false,
	},
	"patient_token_searches_inference_results_of_its_patient": {
		"input": scoped(req(["radiologist"], "search", "InferenceRequest", null), ["patient/*.cruds"], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]},
	},
	"user_token_searches_all_inference_results": {
		"input": scoped(req(["radiologist"], "search", "InferenceRequest", null), ["user/*.cruds"], "P7"),
		"allow": true, "constraints": {},
	},
	# --- auditor ---
	"auditor_searches_audit_events": {
		"input": req(["auditor"], "search", "AuditEvent", null),
		"allow": true, "constraints": {},
	},
	"auditor_exports_audit_events": {"input": req(["auditor"], "export", "AuditEvent", null), "allow": true},
	"auditor_reviews_break_glass": {"input": req(["auditor"], "update", "BreakGlass", null), "allow": true},
	"auditor_reads_no_images": {
		"input": req(["auditor"], "read", "study", "P1"),
		"allow": false, "reasons": ["no role of auditor may read study"],
	},
	"auditor_searches_no_images": {
		"input": req(["auditor"], "search", "study", null),
		"allow": false, "reasons": ["no role of auditor may search study"], "constraints": {},
	},
	"clinicians_see_no_audit": {"input": req(["radiologist"], "search", "AuditEvent", null), "allow": false},
	# --- admin ---
	"admin_deletes": {"input": req(["admin"], "delete", "study", "P1"), "allow": true},
	"admin_exports_audit": {"input": req(["admin"], "export", "AuditEvent", null), "allow": true},
	"admin_system": {"input": req(["admin"], "update", "system", null), "allow": true},
	"admin_searches_unconstrained": {"input": req(["admin"], "search", "study", null), "allow": true, "constraints": {}},
	"admin_reads_mammography": {"input": modalities(req(["admin"], "read", "study", "P3"), ["MG"]), "allow": true},
	# --- researcher and consent ---
	"researcher_reads_consenting_patient": {"input": req(["researcher"], "read", "metadata", "P1"), "allow": true},
	"researcher_denied_opted_out_patient": {
		"input": req(["researcher"], "read", "metadata", "P3"),
		"allow": false, "reasons": ["patient P3 opted out of research use"],
	},
	"researcher_search_excludes_opted_out": {
		"input": req(["researcher"], "search", "study", null),
		"allow": true, "constraints": {"patient_ids_excluded": ["P3"], "modalities_excluded": ["MG"]},
	},
	"researcher_reads_no_patient_records": {"input": req(["researcher"], "read", "Patient", "P1"), "allow": false},
	# --- several roles: the union of what they grant ---
	"referring_researcher_search_union": {
		"input": req(["referring", "researcher"], "search", "study", null),
		"allow": true, "constraints": {"patient_ids_excluded": ["P3"], "modalities_excluded": ["MG"]},
	},
	"care_list_lifts_opt_out_for_treating_clinician": {
		"input": as_sub(req(["referring", "researcher"], "search", "study", null), "dr-p3"),
		"allow": true, "constraints": {"patient_ids_excluded": ["P3"], "modalities_excluded": ["MG"]},
	},
	"referring_researcher_read_via_research": {"input": req(["referring", "researcher"], "read", "study", "P9"), "allow": true},
	"referring_researcher_read_opted_out_outside_care": {
		"input": req(["referring", "researcher"], "read", "study", "P3"),
		"allow": false,
		"reasons": ["patient P3 is not in the care list of dr-who", "patient P3 opted out of research use"],
	},
	"unlimited_role_wins": {
		"input": req(["referring", "radiologist"], "search", "study", null),
		"allow": true, "constraints": {},
	},
	# --- SMART scopes ---
	"patient_scope_search_bound_to_patient": {
		"input": scoped(req(["radiologist"], "search", "study", null), ["patient/ImagingStudy.rs"], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]},
	},
	"patient_scope_reads_own_patient": {
		"input": scoped(req(["radiologist"], "read", "frames", "P7"), ["patient/ImagingStudy.rs"], "P7"),
		"allow": true,
	},
	"patient_scope_denies_other_patient": {
		"input": scoped(req(["radiologist"], "read", "frames", "P8"), ["patient/ImagingStudy.rs"], "P7"),
		"allow": false, "reasons": ["patient P8 is outside the token's patient context"],
	},
	"patient_scope_needs_patient_context": {
		"input": scoped(req(["radiologist"], "read", "frames", "P8"), ["patient/ImagingStudy.rs"], null),
		"allow": false, "reasons": ["patient scopes need a patient context"],
	},
	"patient_scope_within_care_list": {
		"input": scoped(req(["referring"], "search", "study", null), ["patient/ImagingStudy.rs"], "P1"),
		"allow": true, "constraints": {"patient_ids": ["P1"], "modalities_excluded": ["MG"]},
	},
	"patient_scope_outside_care_list": {
		"input": scoped(req(["referring"], "search", "study", null), ["patient/ImagingStudy.rs"], "P9"),
		"allow": true, "constraints": {"patient_ids": [], "modalities_excluded": ["MG"]},
	},
	"patient_scope_opted_out_researcher": {
		"input": scoped(req(["researcher"], "search", "study", null), ["patient/ImagingStudy.rs"], "P3"),
		"allow": true, "constraints": {"patient_ids": [], "modalities_excluded": ["MG"]},
	},
	"user_scope_not_bound_to_patient": {
		"input": scoped(req(["radiologist"], "search", "study", null), ["user/ImagingStudy.rs"], "P7"),
		"allow": true, "constraints": {},
	},
	"scope_must_cover_read": {
		"input": scoped(req(["radiologist"], "read", "study", "P1"), ["user/ImagingStudy.s"], null),
		"allow": false, "reasons": ["token scopes do not permit read on ImagingStudy"],
	},
	"scope_must_cover_create": {
		"input": scoped(req(["technologist"], "create", "study", "P1"), ["user/ImagingStudy.rs"], null),
		"allow": false, "reasons": ["token scopes do not permit create on ImagingStudy"],
	},
	"scope_covers_create": {
		"input": scoped(req(["technologist"], "create", "study", "P1"), ["user/ImagingStudy.crs"], null),
		"allow": true,
	},
	"scope_type_must_match": {
		"input": scoped(req(["radiologist"], "read", "study", "P1"), ["user/DiagnosticReport.rs"], null),
		"allow": false, "reasons": ["token scopes do not permit read on ImagingStudy"],
	},
	"wildcard_scope": {"input": scoped(req(["admin"], "delete", "series", "P1"), ["user/*.cruds"], null), "allow": true},
	"v1_read_scope_reads": {"input": scoped(req(["radiologist"], "read", "rendered", "P1"), ["user/*.read"], null), "allow": true},
	"v1_read_scope_does_not_write": {
		"input": scoped(req(["technologist"], "create", "study", "P1"), ["user/*.read"], null),
		"allow": false,
	},
	"v1_write_scope": {
		"input": scoped(req(["technologist"], "create", "study", "P1"), ["system/ImagingStudy.write"], null),
		"allow": true,
	},
	"v1_star_scope": {"input": scoped(req(["technologist"], "create", "study", "P1"), ["system/*.*"], null), "allow": true},
	"scopes_never_exceed_roles": {
		"input": scoped(req(["auditor"], "read", "study", "P1"), ["user/*.cruds"], null),
		"allow": false, "reasons": ["no role of auditor may read study"],
	},
	"unknown_scope_syntax_permits_nothing": {
		"input": scoped(req(["radiologist"], "read", "study", "P1"), ["user/ImagingStudy.rs?status=final"], null),
		"allow": false, "reasons": ["token scopes do not permit read on ImagingStudy"],
	},
	"non_resource_scopes_rely_on_roles": {
		"input": scoped(req(["radiologist"], "read", "study", "P1"), ["openid", "profile", "launch/patient"], null),
		"allow": true,
	},
	"export_needs_read_and_search_scope": {
		"input": scoped(req(["auditor"], "export", "AuditEvent", null), ["user/AuditEvent.r"], null),
		"allow": false,
	},
	"export_with_read_and_search_scope": {
		"input": scoped(req(["auditor"], "export", "AuditEvent", null), ["user/AuditEvent.rs"], null),
		"allow": true,
	},
	# --- a patient claim binds, with or without patient/ scopes, unless a user/ or system/ scope covers ---
	"patient_claim_without_scopes_search_bound": {
		"input": scoped(req(["radiologist"], "search", "study", null), [], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]}, "obligations": standard,
	},
	"patient_claim_without_scopes_reads_own_patient": {
		"input": scoped(req(["radiologist"], "read", "metadata", "P7"), [], "P7"),
		"allow": true,
	},
	"patient_claim_without_scopes_denies_other_patient": {
		"input": scoped(req(["radiologist"], "read", "metadata", "P8"), [], "P7"),
		"allow": false, "reasons": ["patient P8 is outside the token's patient context"],
	},
	"patient_claim_without_scopes_denies_unknown_patient": {
		"input": scoped(req(["radiologist"], "read", "study", null), [], "P7"),
		"allow": false,
	},
	"patient_claim_binds_reports_and_patients": {
		"input": scoped(req(["ehr"], "search", "Patient", null), [], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]},
	},
	"patient_claim_binds_report_reads": {
		"input": scoped(req(["ehr"], "read", "DiagnosticReport", "P8"), [], "P7"),
		"allow": false,
	},
	"patient_claim_binds_report_writes": {
		"input": scoped(req(["radiologist"], "create", "DiagnosticReport", "P8"), [], "P7"),
		"allow": false, "reasons": ["patient P8 is outside the token's patient context"],
	},
	"patient_claim_binds_inference_results": {
		"input": scoped(req(["radiologist"], "search", "InferenceRequest", null), [], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]},
	},
	"patient_claim_with_non_resource_scopes_bound": {
		"input": scoped(req(["radiologist"], "search", "study", null), ["openid", "launch/patient"], "P7"),
		"allow": true, "constraints": {"patient_ids": ["P7"]},
	},
	"patient_claim_within_care_list": {
		"input": scoped(req(["referring"], "search", "study", null), [], "P2"),
		"allow": true, "constraints": {"patient_ids": ["P2"], "modalities_excluded": ["MG"]},
	},
	"patient_claim_outside_care_list_sees_nothing": {
		"input": scoped(req(["referring"], "search", "study", null), [], "P9"),
		"allow": true, "constraints": {"patient_ids": [], "modalities_excluded": ["MG"]},
	},
	"patient_claim_outside_care_list_reads_nothing": {
		"input": scoped(req(["referring"], "read", "study", "P9"), [], "P9"),
		"allow": false, "reasons": ["patient P9 is not in the care list of dr-who"],
	},
	"patient_claim_leaves_patientless_kinds_alone": {
		"input": scoped(req(["radiologist"], "search", "Model", null), [], "P7"),
		"allow": true, "constraints": {},
	},
	"user_scope_lifts_patient_claim_for_what_it_covers": {
		"input": scoped(req(["radiologist"], "read", "study", "P8"), ["user/ImagingStudy.rs"], "P7"),
		"allow": true,
	},
	"user_scope_of_another_type_does_not_lift_patient_claim": {
		"input": scoped(req(["radiologist"], "read", "DiagnosticReport", "P8"), ["user/ImagingStudy.rs", "patient/DiagnosticReport.rs"], "P7"),
		"allow": false, "reasons": ["patient P8 is outside the token's patient context"],
	},
	"empty_patient_claim_binds_nothing": {
		"input": scoped(req(["radiologist"], "search", "study", null), [], ""),
		"allow": true, "constraints": {},
	},
	# --- break-glass: one patient (and study), for data.break_glass_roles ---
	"break_glass_read_outside_care_list": {
		"input": glass(req(["referring"], "read", "study", "P9"), "P9"),
		"allow": true, "reasons": ["break-glass"], "obligations": flagged,
	},
	"break_glass_reads_only_its_patient": {
		"input": glass(req(["referring"], "read", "study", "P8"), "P9"),
		"allow": false, "reasons": ["patient P8 is not in the care list of dr-who"], "obligations": {"audit": "detailed"},
	},
	"break_glass_lifts_consent_for_its_patient_only": {
		"input": glass(req(["referring"], "read", "study", "P3"), "P9"),
		"allow": false,
	},
	"break_glass_lifts_consent_of_its_patient": {
		"input": glass(req(["referring"], "read", "study", "P3"), "P3"),
		"allow": true, "obligations": flagged,
	},
	"break_glass_search_adds_its_patient": {
		"input": glass(req(["referring"], "search", "study", null), "P9"),
		"allow": true, "reasons": ["break-glass", "granted to role referring"], "obligations": flagged,
		"constraints": {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"], "granted": {"patient_id": "P9"}},
	},
	"break_glass_search_adds_its_study": {
		"input": glass_for(req(["referring"], "search", "series", null), "P9", "1.2.9"),
		"allow": true, "obligations": flagged,
		"constraints": {
			"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"],
			"granted": {"patient_id": "P9", "study_uid": "1.2.9"},
		},
	},
	"break_glass_search_without_a_role_grant_sees_only_its_patient": {
		"input": glass(req(["referring"], "search", "InferenceRequest", null), "P9"),
		"allow": true, "obligations": flagged, "reasons": ["break-glass"],
		"constraints": {"patient_ids": [], "granted": {"patient_id": "P9"}},
	},
	"break_glass_lifts_modality_restriction_of_its_patient": {
		"input": glass(modalities(req(["referring"], "read", "study", "P1"), ["MG"]), "P1"),
		"allow": true, "obligations": flagged,
	},
	"break_glass_keeps_modality_restriction_of_others": {
		"input": glass(modalities(req(["referring"], "read", "study", "P1"), ["MG"]), "P9"),
		"allow": false, "reasons": ["modality MG is restricted to roles admin, radiologist"],
	},
	"break_glass_study_session_reads_its_study": {
		"input": glass_for(modalities(req(["referring"], "read", "study", "P9"), ["MG"]), "P9", "1.2.3"),
		"allow": true, "obligations": flagged,
	},
	"break_glass_study_session_not_other_studies": {
		"input": glass_for(req(["referring"], "read", "study", "P9"), "P9", "1.2.9"),
		"allow": false,
	},
	"break_glass_study_session_reads_reports_of_no_study": {
		"input": glass_for(study_of(req(["referring"], "read", "DiagnosticReport", "P9"), null), "P9", "1.2.9"),
		"allow": true, "obligations": flagged,
	},
	"break_glass_flags_only_what_it_allows": {
		"input": glass(req(["radiologist"], "read", "study", "P1"), "P1"),
		"allow": true, "reasons": ["granted to role radiologist"], "obligations": standard,
	},
	"break_glass_without_patient_grants_nothing": {
		"input": glass(req(["referring"], "read", "study", "P9"), null),
		"allow": false,
	},
	"break_glass_without_patient_adds_no_rows": {
		"input": glass(req(["referring"], "search", "study", null), null),
		"allow": true, "obligations": standard,
		"constraints": {"patient_ids": ["P1", "P2"], "modalities_excluded": ["MG"]},
	},
	"break_glass_only_for_listed_roles": {
		"input": glass(modalities(req(["technologist"], "read", "study", "P1"), ["MG"]), "P1"),
		"allow": false, "reasons": ["modality MG is restricted to roles admin, radiologist"],
	},
	"break_glass_not_for_delete": {"input": glass(req(["referring"], "delete", "study", "P1"), "P1"), "allow": false},
	"break_glass_not_for_audit": {"input": glass(req(["referring"], "search", "AuditEvent", null), "P1"), "allow": false},
	"break_glass_keeps_patient_scope_on_search": {
		"input": glass(scoped(req(["referring"], "search", "study", null), ["patient/ImagingStudy.rs"], "P9"), "P9"),
		"allow": true, "obligations": flagged,
		"constraints": {"patient_ids": [], "modalities_excluded": ["MG"], "granted": {"patient_id": "P9"}},
	},
	"break_glass_keeps_patient_scope_on_read": {
		"input": glass(scoped(req(["referring"], "read", "study", "P8"), ["patient/ImagingStudy.rs"], "P9"), "P8"),
		"allow": false, "reasons": ["patient P8 is not in the care list of dr-who", "patient P8 is outside the token's patient context"],
	},
	"bound_token_session_for_another_patient_adds_no_rows": {
		"input": glass(scoped(req(["referring"], "search", "study", null), [], "P1"), "P9"),
		"allow": true, "obligations": standard, "constraints": {"patient_ids": ["P1"], "modalities_excluded": ["MG"]},
	},
	"break_glass_keeps_scopes": {
		"input": glass(scoped(req(["referring"], "read", "DiagnosticReport", "P9"), ["user/ImagingStudy.rs"], null), "P9"),
		"allow": false, "reasons": ["patient P9 is not in the care list of dr-who", "token scopes do not permit read on DiagnosticReport"],
	},
	"no_session_no_break_glass": {"input": req(["referring"], "read", "study", "P9"), "allow": false},
	"start_break_glass": {
		"input": attributes(req(["referring"], "create", "BreakGlass", "P9"), {"reason": "ED trauma, unconscious"}),
		"allow": true, "obligations": standard,
	},
	"start_break_glass_needs_reason": {
		"input": attributes(req(["referring"], "create", "BreakGlass", "P9"), {"reason": "  "}),
		"allow": false, "reasons": ["breaking the glass needs a reason"],
	},
	"start_break_glass_needs_patient": {
		"input": attributes(req(["referring"], "create", "BreakGlass", null), {"reason": "ED trauma, unconscious"}),
		"allow": false, "reasons": ["breaking the glass needs a patient"],
	},
	"start_break_glass_needs_role": {
		"input": attributes(req(["technologist"], "create", "BreakGlass", "P9"), {"reason": "x"}),
		"allow": false, "reasons": ["no role of technologist may break the glass"],
	},
	"admin_does_not_break_glass": {
		"input": attributes(req(["admin"], "create", "BreakGlass", "P9"), {"reason": "x"}),
		"allow": false,
	},
	"bound_token_breaks_the_glass_for_its_patient": {
		"input": scoped(attributes(req(["referring"], "create", "BreakGlass", "P9"), {"reason": "ED trauma"}), [], "P9"),
		"allow": true,
	},
	"bound_token_cannot_break_the_glass_for_another_patient": {
		"input": scoped(attributes(req(["referring"], "create", "BreakGlass", "P8"), {"reason": "ED trauma"}), [], "P9"),
		"allow": false, "reasons": ["patient P8 is outside the token's patient context"],
	},
	"reviewer_closes_another_subjects_session": {
		"input": reviewing(req(["auditor"], "update", "BreakGlass", null), "dr-house", "test"),
		"allow": true,
	},
	"no_self_review": {
		"input": reviewing(req(["radiologist", "auditor"], "update", "BreakGlass", null), "dr-who", "test"),
		"allow": false, "reasons": ["the subject of a break-glass session may not review it"],
	},
	"no_self_review_for_admins": {
		"input": reviewing(req(["admin"], "update", "BreakGlass", null), "dr-who", "test"),
		"allow": false, "reasons": ["the subject of a break-glass session may not review it"],
	},
	"same_sub_of_another_issuer_may_review": {
		"input": reviewing(req(["auditor"], "update", "BreakGlass", null), "dr-who", "elsewhere"),
		"allow": true,
	},
	# --- FHIR Subscriptions (kind Subscription: no patient; admin and ehr manage them) ---
	"ehr_creates_subscription": {
		"input": req(["ehr"], "create", "Subscription", null),
		"allow": true, "reasons": ["granted to role ehr"],
	},
	"ehr_searches_subscriptions_unconstrained": {
		"input": req(["ehr"], "search", "Subscription", null),
		"allow": true, "constraints": {},
	},
	"ehr_reads_any_report": {"input": req(["ehr"], "read", "DiagnosticReport", "P3"), "allow": true},
	"ehr_does_not_write_reports": {"input": req(["ehr"], "create", "DiagnosticReport", "P1"), "allow": false},
	"radiologist_does_not_subscribe": {
		"input": req(["radiologist"], "create", "Subscription", null),
		"allow": false, "reasons": ["no role of radiologist may create Subscription"],
	},
	"admin_subscribes_with_system_scope": {
		"input": scoped(req(["admin"], "create", "Subscription", null), ["system/Subscription.cruds"], null),
		"allow": true,
	},
	"subscription_needs_its_scope": {
		"input": scoped(req(["ehr"], "create", "Subscription", null), ["system/DiagnosticReport.rs"], null),
		"allow": false, "reasons": ["token scopes do not permit create on Subscription"],
	},
	# --- FHIR batch/transaction Bundles: the envelope is open to every role; each entry is decided alone ---
	"referring_sends_a_bundle": {"input": req(["referring"], "create", "Bundle", null), "allow": true},
	"scoped_app_sends_a_bundle": {
		"input": scoped(req(["radiologist"], "create", "Bundle", null), ["patient/DiagnosticReport.rs"], "P1"),
		"allow": true,
	},
	"bundle_is_only_created": {"input": req(["radiologist"], "read", "Bundle", null), "allow": false},
	"bundle_needs_a_role": {"input": req([], "create", "Bundle", null), "allow": false},
	# --- fail closed, always a reason ---
	"no_roles": {"input": req([], "read", "study", "P1"), "allow": false, "reasons": ["the subject has no role"]},
	"unknown_role": {"input": req(["nobody"], "read", "study", "P1"), "allow": false},
	"unknown_kind": {"input": req(["radiologist"], "read", "Spaceship", null), "allow": false},
	"unknown_action": {"input": req(["radiologist"], "frobnicate", "study", "P1"), "allow": false},
	"empty_input": {"input": {}, "allow": false},
}

# --- rules that need no input: regopy evaluates these directly -----------------------------------------------

test_scope_permissions if {
	authz.scope_perms("rs") == {"r", "s"}
	authz.scope_perms("cruds") == {"c", "r", "u", "d", "s"}
	authz.scope_perms("read") == {"r", "s"}
	authz.scope_perms("write") == {"c", "u", "d"}
	authz.scope_perms("*") == {"c", "r", "u", "d", "s"}
}

test_dicomweb_kinds_are_imaging_studies if {
	every k in ["study", "series", "instance", "frames", "metadata", "bulkdata", "rendered"] {
		data.hounsfield.tables.kind_group[k] == "imaging"
	}
	"imaging" in data.hounsfield.tables.patient_groups
}

test_every_role_is_documented if {
	every role, _ in data.hounsfield.tables.role_permissions {
		role in {"radiologist", "referring", "technologist", "ai-service", "auditor", "researcher", "ehr"}
	}
}

test_sorted_is_an_array if authz.sorted({"b", "a"}) == ["a", "b"]

test_cases_are_well_formed if {
	every name, c in cases {
		is_object(c.input)
		is_boolean(c.allow)
	}
}
