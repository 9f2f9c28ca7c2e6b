"""COCO views addressed by ViewKey, seeded augmentation draws, batching, and the toy digits dataset."""
from .coco import BadImageError, CocoViews, load_coco_json
from .collate import MEAN, STD, Batch, collate_views, make_loader, normalize_and_pad
from .sampling import ViewSampler, draw_train_keys, rank_slice, shard_keys, variant_keys
from .transforms import View, keep_ratio_size, make_view, read_image

__all__ = [
    "MEAN",
    "STD",
    "BadImageError",
    "Batch",
    "CocoViews",
    "View",
    "ViewSampler",
    "collate_views",
    "draw_train_keys",
    "keep_ratio_size",
    "load_coco_json",
    "make_loader",
    "make_view",
    "normalize_and_pad",
    "rank_slice",
    "read_image",
    "shard_keys",
    "variant_keys",
]
