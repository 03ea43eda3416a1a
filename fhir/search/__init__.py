"""FHIR search (R4 3.1.1.5): parsing the parameters (`query`), building the SQL (`sql`), the search index kept per
resource version (`index`), and the entry points that run a search (`service`)."""
