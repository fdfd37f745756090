"""Per-slide patch feature files (the HDF5 contract, readers for other layouts, a shared cache)
and slide-level embeddings from slide encoders."""

from oncoslide.features.cache import CacheStats, FeatureCache
from oncoslide.features.readers import (
    FeatureIndex,
    FeatureInfo,
    find_feature_file,
    inspect_features,
    peek_features,
    read_features,
)
from oncoslide.features.schema import PatchGrid, SlideFeatures, write_feature_file
from oncoslide.features.slide_embeddings import (
    SlideEmbeddingError,
    SlideEmbeddings,
    load_slide_embeddings,
)

__all__ = [
    "CacheStats",
    "FeatureCache",
    "FeatureIndex",
    "FeatureInfo",
    "PatchGrid",
    "SlideEmbeddingError",
    "SlideEmbeddings",
    "SlideFeatures",
    "find_feature_file",
    "inspect_features",
    "load_slide_embeddings",
    "peek_features",
    "read_features",
    "write_feature_file",
]
