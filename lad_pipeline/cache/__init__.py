"""The label cache: the teacher's sparse PAA assignments per view, in a sharded Zarr v3 store.

See docs/cache-format.md for the on-disk format.
"""
from lad_pipeline.cache.info import cache_info, format_info
from lad_pipeline.cache.layout import GridLayout
from lad_pipeline.cache.reader import CachedView, LabelCache
from lad_pipeline.cache.schema import (
    SCHEMA_VERSION,
    ViewGeometry,
    ViewRecord,
    anchor_attrs,
    annotation_fingerprint,
    make_view_record,
)
from lad_pipeline.cache.writer import CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "CacheWriter",
    "CachedView",
    "GridLayout",
    "LabelCache",
    "ViewGeometry",
    "ViewRecord",
    "anchor_attrs",
    "annotation_fingerprint",
    "cache_info",
    "format_info",
    "make_view_record",
]
