"""LoRA presets, trainable heads, adapter save/load/merge, base checks, bundled adapters, unreadable files."""
import json

import pytest
import torch
from transformers import SamModel

from sam_peft.models import (
    LITEMEDSAM_PROCESSOR,
    SamInputProcessor,
    apply_lora,
    default_adapter_for,
    load_adapter,
    load_base_model,
    processor_for,
    save_adapter,
)
from sam_peft.models import lora
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
    assert (info["base"], info["base_kind"], info["preset"]) == ("base", "directory", "encoder+decoder")
    assert SamInputProcessor.from_dict(info["preprocessing"]) == processor_for(tiny_base)
    for name in ("sam_peft.json", "adapter_config.json"):  # nothing that only means something on this machine
        assert str(tmp_path) not in (tmp_path / "adapter" / name).read_text()

    with pytest.raises(ValueError, match=r"local directory 'base' .*pass base=sam_peft.load_base_model"):
        load_adapter(tmp_path / "adapter")  # a local base does not travel with the adapter
    loaded = load_adapter(tmp_path / "adapter", base=load_base_model(tmp_path / "base"))
    after = _outputs(loaded)
    assert (before.pred_masks - after.pred_masks).abs().max() < 1e-5
    assert (before.iou_scores - after.iou_scores).abs().max() < 1e-5

    merged = loaded.merge_and_unload()
    assert type(merged) is SamModel
    assert (_outputs(merged).pred_masks - before.pred_masks).abs().max() < 1e-4


def test_adapter_keeps_the_preprocessing_it_was_trained_with(tiny_base, tmp_path):
    model = apply_lora(tiny_base, preset="decoder", r=2, verbose=False)
    recorded = SamInputProcessor(image_size=128, pixel_mean=None, pixel_std=None, resize="square",
                                 resample="spline3", normalize="min_max")
    model.sam_peft_info["preprocessing"] = recorded.to_dict()
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter", base=load_base_model(tmp_path / "base"))
    assert processor_for(loaded) == recorded != processor_for(load_base_model(tmp_path / "base"))


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


def test_unreadable_adapter_files_name_the_file(tiny_base, tmp_path):
    save_adapter(apply_lora(tiny_base, preset="decoder", r=2, verbose=False), tmp_path / "adapter")
    base = load_base_model(tmp_path / "base")
    for name, what in [("adapter_model.safetensors", "adapter weights file"), ("adapter_config.json", "peft adapter config"),
                       ("sam_peft.json", "sam_peft adapter record")]:
        path = tmp_path / "adapter" / name
        intact = path.read_bytes()
        path.write_bytes(intact[: len(intact) // 2])  # as an interrupted copy or download leaves it
        with pytest.raises(ValueError, match=rf"{name}: the {what} cannot be read .*copy or download it again"):
            load_adapter(tmp_path / "adapter", base=base)
        path.write_bytes(intact)
    assert load_adapter(tmp_path / "adapter", base=base) is not None


@pytest.fixture()
def bundled_root(tmp_path, monkeypatch):
    """An empty stand-in for the installed sam_peft/adapters folder."""
    monkeypatch.setattr(lora, "ADAPTERS_DIR", tmp_path / "adapters")
    return tmp_path / "adapters"


def test_bundled_adapter_loads_by_name_offline(bundled_root):
    assert default_adapter_for("litemedsam") is None  # not installed
    with pytest.raises(FileNotFoundError, match=r"bundled adapter 'litemedsam-phpg': .*reinstall sam_peft"):
        load_adapter("litemedsam-phpg")

    model = apply_lora(load_base_model("litemedsam"), preset="decoder", r=2, train_heads=("iou",), verbose=False)
    _perturb_adapters(model)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[40.0, 50, 160, 170]]])
    with torch.no_grad():
        expected = model.eval()(pixel_values=image, input_boxes=boxes, multimask_output=False).pred_masks
    save_adapter(model, bundled_root / "litemedsam-phpg")

    assert default_adapter_for("litemedsam") == "litemedsam-phpg" and default_adapter_for("facebook/sam-vit-base") is None
    loaded = load_adapter("litemedsam-phpg")  # HF_HUB_OFFLINE=1 (conftest): nothing may come from the network
    assert processor_for(loaded) == LITEMEDSAM_PROCESSOR
    with torch.no_grad():
        got = loaded(pixel_values=image, input_boxes=boxes, multimask_output=False).pred_masks
    assert (got - expected).abs().max() < 1e-5
    plain = load_base_model("litemedsam")  # the base name stays the plain base
    assert not any("lora_" in n for n, _ in plain.named_parameters())


def test_unknown_adapter_names_are_refused_without_a_download():
    with pytest.raises(FileNotFoundError, match=r"'litemedsam_phpg': not a bundled adapter \(litemedsam-phpg\)"):
        load_adapter("litemedsam_phpg")


def test_box_prompts_base_answers_boxes_through_the_base_and_clicks_through_the_adapter(tiny_base, tmp_path):
    from sam_peft.models.decoding import decode_regions

    model = apply_lora(tiny_base, preset="decoder", r=4, train_heads=("iou", "hypernetworks"), verbose=False)
    _perturb_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    def base():  # loading an adapter injects its layers into the base: each load gets a fresh one
        return load_base_model(tmp_path / "base")

    routed = load_adapter(tmp_path / "adapter", base=base(), box_prompts="base")
    torch.manual_seed(2)
    embeddings = torch.randn(1, 32, 8, 8)
    # region 0: a box; region 1: a box and a click; region 2: one click (PAD-padded to 3 tokens)
    points = torch.tensor([[[[10.0, 20], [90, 100], [0, 0]], [[10, 20], [90, 100], [50, 60]],
                            [[50, 60], [0, 0], [0, 0]]]])
    labels = torch.tensor([[[2, 3, -1], [2, 3, 1], [1, -1, -1]]])
    with torch.no_grad():
        got, got_iou = decode_regions(routed, embeddings, points, labels)
        adapted, _ = decode_regions(model.eval(), embeddings, points, labels)
        with model.disable_adapter():
            plain, plain_iou = decode_regions(model, embeddings, points, labels)
    assert (adapted[0, 0] - plain[0, 0]).abs().max() > 1e-3  # the adapter changes boxes: the test can fail
    assert torch.allclose(got[0, 0], plain[0, 0], atol=1e-6) and torch.allclose(got_iou[0, 0], plain_iou[0, 0])
    assert torch.allclose(got[0, 1:], adapted[0, 1:], atol=1e-6)
    with torch.enable_grad():  # training never routes
        trained, _ = decode_regions(routed, embeddings, points, labels)
    assert torch.allclose(trained[0, 0].detach(), adapted[0, 0], atol=1e-6)
    assert load_adapter(tmp_path / "adapter", base=base()).sam_peft_box_prompts == "adapter"  # recorded default
    with pytest.raises(ValueError, match="box_prompts must be one of adapter, base, got 'both'"):
        load_adapter(tmp_path / "adapter", base=base(), box_prompts="both")
    save_adapter(apply_lora(base(), preset="encoder", r=2, verbose=False), tmp_path / "encoder_adapter")
    with pytest.raises(ValueError, match="changes the image encoder"):
        load_adapter(tmp_path / "encoder_adapter", base=base(), box_prompts="base")
