"""The early-exit runtime: ``ExitRunner`` routes each sample of a batch to its exit and skips the rest.

``runner`` (the runner), ``core`` (what it routes with, one per mode: staged, hooked, loaded),
``staged`` and ``hooked`` (the two routing engines), ``carried`` (what may cross a cut), ``checks``
(the inputs' checks), ``macs`` (the MAC table), ``archive`` (save and load), ``onnx_export`` (one ONNX
model that routes each sample itself: ``pieces`` captured by torch.export, ``compose`` into one graph),
``result`` (``ExitResult``), ``benchmark`` (``bx.benchmark``:
timing the runner against the model; not re-exported here, so that the name keeps naming the module).
"""

from .result import ExitResult
from .runner import ExitRunner

__all__ = ["ExitResult", "ExitRunner"]
