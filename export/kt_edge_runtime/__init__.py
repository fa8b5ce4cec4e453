"""kt-edge device runtime: load and verify bundles, run them with ONNX Runtime or TensorRT.

Imports no torch, so it installs on a bare Jetson next to TensorRT.
"""

from .bundle import SCHEMA_VERSION, BundleError, Manifest, load_bundle, sha256_file, write_manifest
from .parity import DEFAULT_THRESHOLDS, Thresholds, accuracy_parity, golden_parity, knn_top1

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLDS",
    "SCHEMA_VERSION",
    "BundleError",
    "Manifest",
    "Thresholds",
    "accuracy_parity",
    "golden_parity",
    "knn_top1",
    "load_bundle",
    "sha256_file",
    "write_manifest",
]
