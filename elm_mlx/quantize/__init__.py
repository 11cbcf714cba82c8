"""Calibrated and mixed-precision quantization (`elm convert --quantize --calibrate --bpw B`).

Imports only the model families and errors: the converter drives it on a float model.
"""

from .calibration_text import (
    CalibrationConfig,
    CalibrationData,
    default_text,
    default_texts,
    read_dataset,
    read_text,
    split,
)
from .distill import DistillConfig
from .grid import Setting
from .layers import dequantized_view, float_weights
from .mixed import CANDIDATES, bits_per_weight, quantization_config
from .recipe import check_budget, quantize_model

__all__ = [
    "CANDIDATES",
    "CalibrationConfig",
    "CalibrationData",
    "DistillConfig",
    "Setting",
    "bits_per_weight",
    "check_budget",
    "default_text",
    "default_texts",
    "dequantized_view",
    "float_weights",
    "quantization_config",
    "quantize_model",
    "read_dataset",
    "read_text",
    "split",
]
