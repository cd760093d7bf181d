"""The CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation" protocol: its case
files, 3D box-and-click segmentation with a 2D model, and the box + five clicks evaluation."""
from .challenge import run_challenge, segment_case
from .format import ChallengeCase, boxes_of, read_case, write_case, write_cases
from .protocol import auc, error_click, evaluate_protocol, step_scores
from .segmenter import EmbeddingCache, Segmenter

__all__ = ["ChallengeCase", "EmbeddingCache", "Segmenter", "auc", "boxes_of", "error_click", "evaluate_protocol",
           "read_case", "run_challenge", "segment_case", "step_scores", "write_case", "write_cases"]
