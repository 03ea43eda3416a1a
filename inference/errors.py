"""The inference package's exception family (house style 3): each carries its detail; `server.errors` maps them
to HTTP statuses at the edge."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of the family: a request the inference service cannot honour (400 unless a subclass says more)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidModel(InferenceError):
    """A model registration or input selector is malformed (400)."""


class ModelNotFound(InferenceError):
    """No model with that name (and version) is registered (404)."""


class ModelExists(InferenceError):
    """That name and version is registered already (409): versions are immutable, register a new one."""


class RequestNotFound(InferenceError):
    """No inference request with that id (404)."""


class InputNotFound(InferenceError):
    """The study or series of an on-demand request is not in the archive (404)."""


class InputRejected(InferenceError):
    """The model cannot take the series of an on-demand request (its input selector does not match) (422)."""


class ModelFailed(InferenceError):
    """A model could not produce a result for its input (the job is retried, then fails visibly)."""
