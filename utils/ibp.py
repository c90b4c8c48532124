"""Interval bound propagation, as the scripts and studies use it: the core lives with the models
(`models/ibp.py`, so a model such as ProoD bounds itself without importing from utils/); these names stay here.

    from utils.ibp import confidence_upper_bound
    bound = confidence_upper_bound(net, x, eps=0.3)    # any chain of supported layers, or a list of layers
"""
from models.ibp import (LAYER_BOUNDS, SUPPORTED, UnsupportedLayerError, confidence_upper_bound, input_box,
                        interval_bounds, layer_sequence, log_confidence_bound_from_differences,
                        logit_difference_bounds, round_up_to)

__all__ = ["LAYER_BOUNDS", "SUPPORTED", "UnsupportedLayerError", "confidence_upper_bound", "input_box",
           "interval_bounds", "layer_sequence", "log_confidence_bound_from_differences", "logit_difference_bounds",
           "round_up_to"]
