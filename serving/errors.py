"""Errors of the serving layer; the servicer maps each to one gRPC status code."""

from __future__ import annotations

from towerline.errors import TowerlineError


class InvalidArgument(TowerlineError):
    """A request field is out of bounds; `field` names it (→ INVALID_ARGUMENT)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class DeadlineExceeded(TowerlineError):
    """The caller's deadline ran out before the expensive part (→ DEADLINE_EXCEEDED)."""


class RetrievalRpcError(TowerlineError):
    """A call to the retrieval service failed; `code` is the gRPC status code's name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
