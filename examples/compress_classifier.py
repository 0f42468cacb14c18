"""Distiller's early-exit command line on branchify: the same as the ``branchify-train`` command.

    python examples/compress_classifier.py --arch=resnet32_cifar_earlyexit --epochs=20 -b 128 \\
        --lr=0.003 --earlyexit_thresholds 0.4 --earlyexit_lossweights 0.4 -j 2 \\
        --out-dir runs -n earlyexit path/to/cifar-10-batches-py

Use ``--dataset digits`` (or ``digits`` as the dataset) to run offline; ``--help`` lists every flag,
and docs/distiller.md maps Distiller's flags to branchify's.
"""

import sys

from branchify.distiller.train import main

if __name__ == "__main__":
    sys.exit(main())
