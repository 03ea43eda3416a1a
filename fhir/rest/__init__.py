"""The FHIR REST API (R4 3.1.0): the `/fhir` router, instance-level interactions (`instance`), type-level search
(`search`), batch and transaction bundles (`bundle`, `bundles`: the codec), capabilities (`meta`), what they share
(`interactions`) and the resource hooks the guard runs (`access`)."""
