"""
Response length predictor (RLP): a small model that classifies a prompt into length buckets.

TimeBill's WCET (and hence the eviction ratio α) scales with the predicted response length N̂.
The implementation lives in :mod:`timebill_ros.core.rlp` (label space, backbones, predictor,
training); this module keeps the import path that the nodes, CLIs and tests use, re-exporting
the public names so callers need not know how the package is split.
"""

from __future__ import annotations

from .rlp.backbones import CausalLMBackbone, make_backbone, make_head, minilm_path, MiniLMBackbone
from .rlp.buckets import (
    bucket_upper_edge,
    compress_ids,
    edges_to_class,
    equal_width_edges,
    HEADS,
    length_to_bucket,
    MINILM,
    Prediction,
    PredictorMeta,
)
from .rlp.predictor import (
    checkpoint_dir,
    LengthPredictor,
    load_length_predictor,
    log,
    NMaxPredictor,
)
from .rlp.train import (
    _select_bucket_head,
    candidate_layers,
    frozen_features,
    layer_features,
    select_feature_layer,
    train_predictor,
)
from .rlp.training import fine_tune, fine_tune_top, regression_metrics, targets_for, train_head

__all__ = [
    'HEADS',
    'MINILM',
    'CausalLMBackbone',
    'LengthPredictor',
    'MiniLMBackbone',
    'NMaxPredictor',
    'Prediction',
    'PredictorMeta',
    'bucket_upper_edge',
    'candidate_layers',
    'checkpoint_dir',
    'compress_ids',
    'edges_to_class',
    'equal_width_edges',
    'fine_tune',
    'fine_tune_top',
    'frozen_features',
    'layer_features',
    'length_to_bucket',
    'load_length_predictor',
    'log',
    'make_backbone',
    'make_head',
    'minilm_path',
    'regression_metrics',
    'select_feature_layer',
    'targets_for',
    'train_head',
    'train_predictor',
    '_select_bucket_head',
]
