"""DICOMweb's dependencies as route handlers declare them (Litestar named dependencies provided by
`dicomweb.plugin`, and the server's settings as DICOMweb reads them)."""

from __future__ import annotations

from typing import TypeAlias

from dicomweb.blobs import BlobStore
from dicomweb.ingest.service import StoreService
from dicomweb.retrieve.rendered import RenderService
from dicomweb.retrieve.service import RetrieveService
from dicomweb.settings import DicomwebSettings
from server.platform.deps import Provided

SettingsDep: TypeAlias = Provided[DicomwebSettings]
BlobsDep: TypeAlias = Provided[BlobStore]
StoreDep: TypeAlias = Provided[StoreService]
RetrieveDep: TypeAlias = Provided[RetrieveService]
RenderDep: TypeAlias = Provided[RenderService]
