"""AI on ingest: the model registry, dispatch of complete series to matching models through the job
queue, inference backends (in-process worker pool), model adapters, and the results as DICOM SEG in the archive
and FHIR DiagnosticReports. No HTTP types here except in `inference.routes`."""
