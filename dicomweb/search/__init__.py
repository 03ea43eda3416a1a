"""QIDO-RS (PS3.18 10.6): query parameters (`query`), the index levels and columns (`levels`), the access
constraints a policy puts on searches (`access`) and the search service (`service`)."""
