"""HTTP edge for DICOMweb: thin Litestar handlers that parse requests into domain calls."""
