"""The bottom layer, importable from everywhere above it: process groups (:mod:`~detfocal.utils.comm`),
atomic file writes (:mod:`~detfocal.utils.io`), the registries (:mod:`~detfocal.utils.registry`),
box arithmetic (:mod:`~detfocal.utils.box_ops`) and every private torch/torchvision name
detfocal relies on (:mod:`~detfocal.utils._compat`)."""
