"""The CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" protocol: its case
files, 3D box-and-click segmentation with a 2D model, and the box + five clicks evaluation.

Names are imported on first use, so that `sam_peft.cvpr25.cli` builds its parsers without loading torch.
"""
from importlib import import_module

_WHERE = {"run_challenge": "challenge", "segment_case": "challenge", "ChallengeCase": "format",
          "boxes_of": "format", "read_case": "format", "write_case": "format", "write_cases": "format",
          "auc": "protocol", "error_click": "protocol", "evaluate_protocol": "protocol", "step_scores": "protocol",
          "EmbeddingCache": "segmenter", "Segmenter": "segmenter"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
