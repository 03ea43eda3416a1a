"""Conformance documents (DICOM Conformance Statement) and the checks that keep them true."""
