"""LoRA presets, trainable heads, adapter save/load/merge, and base checks."""
import json

import pytest
import torch
from transformers import SamModel

from sam_peft.models import apply_lora, load_adapter, load_base_model, save_adapter
from test_models import tiny_sam_config


@pytest.fixture()
def tiny_base(tmp_path):
    torch.manual_seed(0)
    SamModel(tiny_sam_config()).save_pretrained(tmp_path / "base")
    return load_base_model(str(tmp_path / "base"))


def _perturb_adapters(model):
    """LoRA B starts at zero (an identity adapter); make it non-trivial so equality tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)


def _outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 128, 128, generator=g)
    with torch.no_grad():
        return model(pixel_values=x, input_boxes=torch.tensor([[[10.0, 20, 90, 100], [30, 30, 60, 70]]]),
                     multimask_output=True)


@pytest.mark.parametrize("preset, expect, avoid", [
    ("decoder", "mask_decoder.transformer", "vision_encoder"),
    ("encoder", "vision_encoder", "mask_decoder"),
    ("encoder+decoder", "vision_encoder", None),
])
def test_presets_target_the_right_modules(tiny_base, preset, expect, avoid):
    model = apply_lora(tiny_base, preset=preset, r=4, verbose=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(expect in n for n in trainable)
    if avoid:
        assert not any(avoid in n for n in trainable)
    if preset == "encoder+decoder":
        assert any("mask_decoder" in n for n in trainable)


def test_litemedsam_encoder_preset_hits_tinyvit_attention():
    model = apply_lora(load_base_model("litemedsam"), preset="encoder", r=4, verbose=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("tinyvit.layers.1.blocks.0.attn.qkv.lora_A" in n for n in names)


def test_heads_train_in_full_and_positional_embedding_stays_tied(tiny_base, capsys):
    model = apply_lora(tiny_base, preset="decoder", r=4, train_heads=("iou", "hypernetworks"))
    assert "trainable params" in capsys.readouterr().out
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("iou_prediction_head" in n and "modules_to_save" in n for n in trainable)
    assert any("output_hypernetworks_mlps.3" in n for n in trainable)
    base = model.get_base_model()
    assert base.prompt_encoder.shared_embedding.positional_embedding is base.shared_image_embedding.positional_embedding


def test_adapter_roundtrip_merge_and_records_base(tiny_base, tmp_path):
    model = apply_lora(tiny_base, preset="encoder+decoder", r=4, train_heads=("iou",), verbose=False)
    _perturb_adapters(model)
    model.eval()
    before = _outputs(model)
    save_adapter(model, tmp_path / "adapter")
    info = json.loads((tmp_path / "adapter" / "sam_peft.json").read_text())
    assert info["base"] == tiny_base.name_or_path and info["preset"] == "encoder+decoder"

    loaded = load_adapter(tmp_path / "adapter")  # rebuilds the base from the record
    after = _outputs(loaded)
    assert (before.pred_masks - after.pred_masks).abs().max() < 1e-5
    assert (before.iou_scores - after.iou_scores).abs().max() < 1e-5

    merged = loaded.merge_and_unload()
    assert type(merged) is SamModel
    assert (_outputs(merged).pred_masks - before.pred_masks).abs().max() < 1e-4


def test_adapter_refuses_another_base(tiny_base, tmp_path):
    model = apply_lora(tiny_base, preset="decoder", r=4, verbose=False)
    save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(123)
    other = SamModel(tiny_sam_config()).eval()
    with pytest.raises(ValueError, match="adapter was made for base"):
        load_adapter(tmp_path / "adapter", base=other)


def test_bad_lora_arguments(tiny_base, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA preset 'everything'"):
        apply_lora(tiny_base, preset="everything")
    with pytest.raises(ValueError, match="unknown train_heads"):
        apply_lora(tiny_base, train_heads=("prompt_encoder",))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tmp_path)
