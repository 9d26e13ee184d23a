"""Drop-in replacement for the reference code's ``utils`` and ``networks`` modules
(VICO-UoE/DatasetCondensation): ``from fastdd.compat.utils import *`` /
``from fastdd.compat.networks import *``, or run a script unchanged with ``python -m fastdd.compat``."""
