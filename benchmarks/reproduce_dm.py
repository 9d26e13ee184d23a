"""Reproduce DM's published Fashion-MNIST numbers with the full reference protocol (GPU).

Protocol (spec ``dm_dance.md`` §1.4–1.8): ConvNet-3, 20,000 iterations, 256 real images per class,
SGD on pixels (lr 1, momentum 0.5), real init, DSA 'color_crop_cutout_flip_scale_rotate'; evaluation of
the final set with 5 freshly initialised ConvNet-3 models × 1000 epochs (reference loop: 1001 passes,
lr ×0.1 after pass 501), batch 256, per-sample DSA; mean ± std of the last-epoch test accuracy. The random
baseline is the initial real subset, trained with the same protocol and paired initialisations.

Published (DM paper, as quoted by the DANCE paper's Table 1): IPC 1 / 10 / 50 = 70.7±0.6 / 83.5±0.3 /
88.1±0.6. The results are appended to ``benchmarks/results/reproduce_dm.md`` with device, date, versions
and commit. Each IPC takes tens of minutes on an H100; a CPU run of the full protocol is impractical
(use ``--iterations``/``--epochs`` to scale it down, and the table will say so).

    python benchmarks/reproduce_dm.py [--ipc 1 10 50] [--data-path DIR] [--device cuda] [--smoke]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _reproduce import method_main  # noqa: E402

PUBLISHED = {"fashion-mnist": {1: "70.7 ± 0.6", 10: "83.5 ± 0.3", 50: "88.1 ± 0.6"}}


def main(argv=None) -> int:
    return method_main("dm", "fashion-mnist", PUBLISHED, "DM: fastdd vs published (reproduce_dm.py)", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
