from detector.layers.batch_norm import FrozenBatchNorm2d, get_norm
from detector.layers.roi_align import RoIAlign, boxes_to_rois, roi_align
from detector.layers.wrappers import Conv2d, fold_frozen_batchnorm

__all__ = ["Conv2d", "FrozenBatchNorm2d", "RoIAlign", "boxes_to_rois", "fold_frozen_batchnorm", "get_norm",
           "roi_align"]
