"""Where an instance came from: the channel that received it and what that channel knows of the sender.

Every ingest channel hands the store one of these with the spooled bytes (`StoreService.store`), and the
listeners see it in the event (`dicomweb.ingest.events.InstanceStored`): the DIMSE router matches rules on the
calling AE title from here. It is a value, made once at the edge of each channel, in the manner of Orthanc's
`DicomInstanceOrigin` (request origin, remote address, calling and called AE titles, user name)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Channel(enum.StrEnum):
    """The ingest channels."""

    STOW = "stow"
    """STOW-RS (PS3.18 10.5)."""
    DIMSE = "dimse"
    """C-STORE (PS3.4 Annex B)."""
    IMPORT = "import"
    """`hounsfield import DIR`: files read from a local folder by the operator."""
    INFERENCE = "inference"
    """An AI result (SEG, SR) stored by the inference runner as the AI service."""


@dataclass(frozen=True, slots=True)
class Origin:
    """The channel and what it knows: the sender's subject and network address (STOW-RS, C-STORE, inference), the
    calling and called AE titles (C-STORE, PS3.8 7.1.1.3-4), the source of an import or of an AI result. Fields a
    channel cannot know are None. Made with the constructor of the channel."""

    channel: Channel
    subject: str | None = None
    """The authenticated subject (a token's `sub`, a configured DIMSE peer's, the AI service's)."""
    address: str | None = None
    """The client's IP address, as the connection shows it."""
    calling_ae: str | None = None
    called_ae: str | None = None
    source: str | None = None
    """What the instance was made or read from: an imported file's path under the folder, the model (name:version)
    of an AI result."""

    def __post_init__(self) -> None:
        if (self.calling_ae is not None or self.called_ae is not None) and self.channel is not Channel.DIMSE:
            raise ValueError("AE titles name the peers of a DIMSE association only")

    @classmethod
    def stow(cls, subject: str | None, address: str | None) -> Origin:
        return cls(Channel.STOW, subject=subject, address=address)

    @classmethod
    def dimse(cls, calling_ae: str, called_ae: str | None, subject: str | None, address: str | None) -> Origin:
        return cls(Channel.DIMSE, subject=subject, address=address, calling_ae=calling_ae, called_ae=called_ae)

    @classmethod
    def imported(cls, path: str) -> Origin:
        return cls(Channel.IMPORT, source=path)

    @classmethod
    def inference(cls, subject: str, model: str) -> Origin:
        return cls(Channel.INFERENCE, subject=subject, source=model)
