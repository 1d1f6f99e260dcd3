"""Error types of graphopt. Each message is one line that says what went wrong and where."""
from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError):
    """The model could not be captured into the IR."""


class UnsupportedOpError(GraphoptError):
    """An op that an importer or a backend cannot handle; the message names op and node."""


class InputSpecError(GraphoptError, ValueError):
    """A call-time input does not match the captured input specification."""


class PassError(GraphoptError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class PassContractError(PassError):
    """A pass broke the pass contract (wrong return type, dishonest `modified`)."""


class PreconditionError(PassError):
    """A pass's `requires` hook rejected the graph."""


class PostconditionError(PassError):
    """A pass's `ensures` hook rejected the graph it produced."""


class VerificationError(PassError):
    """The graph after a pass is malformed or its outputs moved beyond the pass's tolerance."""


class BackendError(GraphoptError):
    """A backend could not lower or run the graph."""


class ArtifactError(GraphoptError):
    """An artifact directory is missing, corrupted, truncated or of an unknown format."""
