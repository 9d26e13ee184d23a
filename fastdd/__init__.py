"""fastdd: fast dataset distillation (dataset condensation).

Public entry points:

- :mod:`fastdd.data`     dataset readers, normalisation stats, on-device class-indexed sampler
- :mod:`fastdd.models`   ConvNet family, ResNet-18, MLP with generator-seeded initialisation
- :mod:`fastdd.augment`  DSA differentiable siamese augmentation
- :mod:`fastdd.methods`  distillation methods behind a registry (``fastdd.methods.get("dm")``)
- :mod:`fastdd.evaluate` evaluation protocols (several models trained at once)
- :mod:`fastdd.synset`   the saved synthetic-set format
"""
__version__ = "0.1.0"
