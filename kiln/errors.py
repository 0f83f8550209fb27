"""kiln's exception hierarchy.

Every error a user can cause derives from :class:`KilnError`. Messages are one
line: what went wrong, where (file, node, op or field) and what to do about it.
The CLI prints ``str(err)`` and exits with code 2; only ``--debug`` shows a
traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error kiln reports to a user."""

    exit_code: int = 2


class ModelLoadError(KilnError):
    """The model file is missing, unreadable, not ONNX, or truncated."""


class ExternalDataError(ModelLoadError):
    """A tensor's external data file is missing or too short."""


class UnsupportedOpError(KilnError):
    """The model uses ops kiln cannot evaluate or compile.

    ``ops`` maps ``(domain, op_type)`` to the names of the nodes that use it.
    """

    def __init__(self, message: str, ops: dict[tuple[str, str], list[str]] | None = None):
        super().__init__(message)
        self.ops = dict(ops or {})


class GraphError(KilnError):
    """The graph is malformed: a cycle, an undefined value, a broken use-def link."""


class VerifyError(GraphError):
    """``Graph.verify()`` found a broken invariant."""


class EvaluationError(KilnError):
    """The reference evaluator failed on a node."""


class InputError(KilnError):
    """Inputs given at run time do not match the model's signature, or hold values the model refuses."""


#: The start of a message from a check compiled into an artifact's kernels (an index out of range):
#: the runtime reports what follows it as an :class:`InputError`.
RUNTIME_CHECK = "kiln-check: "
