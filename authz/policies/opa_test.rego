# The case table (cases_test.rego) as one OPA test: `opa test authz/policies -v`. Not run by regopy, which
# crashes on `with input as` (tests/test_policies.py runs the same cases through the engine instead).
package hounsfield.authz_test

import data.hounsfield.authz

matches(d, c) if {
	d.allow == c.allow
	object.get(c, "reasons", d.reasons) == d.reasons
	object.get(c, "constraints", d.constraints) == d.constraints
	object.get(c, "obligations", d.obligations) == d.obligations
	count(d.reasons) > 0
}

test_cases if {
	every _, c in cases {
		d := authz.decision with input as c.input
			with data.care_lists as fixture_data.care_lists
			with data.research_opt_out as fixture_data.research_opt_out
			with data.restricted_modalities as fixture_data.restricted_modalities
			with data.break_glass_roles as fixture_data.break_glass_roles
		matches(d, c)
	}
}
