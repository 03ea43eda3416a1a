"""Classic DICOM networking (DIMSE, PS3.7/PS3.8): a pynetdicom Application Entity in the same service as
DICOMweb. C-ECHO, C-STORE (through the STOW-RS ingest path), C-FIND (through the QIDO-RS query engine),
C-MOVE and C-GET, and auto-routing of new instances to remote AEs through the job queue. Calling AE titles map
to identities whose every operation the same policy decides and the same audit trail records."""
