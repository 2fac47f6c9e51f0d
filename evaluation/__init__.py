"""Evaluation: retrieval metrics (R@K, MdR, MnR) and re-scoring; generation metrics."""
from .retrieval import dual_softmax, querybank_normalize, retrieval_metrics
from .generation import (feature_statistics, fid_from_features, frechet_distance, inception_score,
                         kid_from_features, r_precision)
