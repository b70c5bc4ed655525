"""COCO data for detfocal: the dataset, image decoding, augmentation, subsets and the embedded shapes dataset."""
from detfocal.data import shapes
from detfocal.data.coco import CocoDetection, collate_fn
from detfocal.data.images import load_image, to_uint8
from detfocal.data.subset import check_output_path, load_coco_annotations, make_subset
from detfocal.data.transforms import build_transforms

__all__ = ["CocoDetection", "build_transforms", "check_output_path", "collate_fn", "load_coco_annotations",
           "load_image", "make_subset", "shapes", "to_uint8"]
