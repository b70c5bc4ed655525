"""COCO data for detfocal: the dataset, augmentation, subsets and the embedded shapes dataset."""
from detfocal.data import shapes
from detfocal.data.coco import CocoDetection, collate_fn
from detfocal.data.subset import load_coco_annotations, make_subset
from detfocal.data.transforms import build_transforms

__all__ = ["CocoDetection", "build_transforms", "collate_fn", "load_coco_annotations", "make_subset", "shapes"]
