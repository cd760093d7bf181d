#!/bin/sh
# One interaction step of the CVPR 2025 interactive 3D challenge, as the evaluator runs it in the container
# (working directory /workspace, inputs/ and outputs/ mounted): inputs/*.npz -> outputs/<case>.npz ('segs').
# The six steps of a case are six runs; slice embeddings and masks are kept in outputs/.sam_peft_cache.
set -e
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
sam-peft challenge --inputs inputs --outputs outputs "$@"
