"""Hounsfield's FHIR R4 API. `fhir.resources` owns the top-level name `fhir` too: extend the package path so
both `fhir.resources` (the models) and our modules import (DESIGN.md)."""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
