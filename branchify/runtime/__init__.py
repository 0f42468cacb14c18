"""The early-exit runtime: ``ExitRunner`` routes each sample of a batch to its exit and skips the rest.

``runner`` (the runner), ``staged`` and ``hooked`` (the two routing engines), ``carried`` (what may
cross a cut), ``archive`` (save and load), ``onnx_export`` (one ONNX model that routes each sample
itself), ``result`` (``ExitResult``), ``benchmark`` (``bx.benchmark``:
timing the runner against the model; not re-exported here, so that the name keeps naming the module).
"""

from .result import ExitResult
from .runner import ExitRunner

__all__ = ["ExitResult", "ExitRunner"]
