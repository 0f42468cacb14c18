"""Distiller compatibility: its CIFAR ResNets, its datasets, its trainer and its command-line flags.

Nothing in the core imports this package; it is built on the public API (spec -> capture -> module ->
loss | stats | runtime | calibration | sweep). ``models``: the CIFAR ResNets and Distiller's exit
places; ``data``: digits (offline), CIFAR-10 and ImageFolder; ``flags``: ``compress_classifier.py``'s
flags and ``spec_from_args``; ``train``: the ``branchify-train`` command.
"""

from .flags import spec_from_args

__all__ = ["spec_from_args"]
