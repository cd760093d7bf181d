"""The PHPG training step: multi-region decoding, padding, refinement clicks, losses and a few real AdamW steps.

Logic runs on a tiny random SAM (128 input, 8x8 embedding, 32x32 low-res masks) with hand-made batches;
the collator path and learning run on LiteMedSAM with phantom slices.
"""
import numpy as np
import pytest
import torch
from transformers import SamModel

from sam_peft.data import phantom_dataset, read_metadata
from sam_peft.models import apply_lora, load_base_model, processor_for
from sam_peft.models.decoding import PAD_LABEL, decode_regions, embed_prompt_tokens, encode_images, is_single_click
from sam_peft.prompts import PHPGCollator
from sam_peft.training.step import PHPGStep, hard_iou, phpg_forward, segmentation_loss

from test_models import tiny_sam_config

SIDE, SCALE = 32, 4  # the tiny model's low-res side, and model-input pixels per low-res pixel
BOX, CLICK = [2, 3], [1]

# Rectangles (y0, y1, x0, x1) in the low-res frame and the prompt each region gets; None = padding.
REGIONS = [
    [((4, 14, 6, 20), "box"), ((18, 28, 3, 12), "click"), ((20, 30, 16, 30), "box+click"), None],
    [((2, 10, 2, 30), "clicks"), ((12, 26, 10, 22), "click"), None, None],
]


def _prompt(rect, kind):
    """Model-input-frame points and labels, padded to 3 tokens."""
    y0, y1, x0, x1 = rect
    centre = [(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2]
    box = [[x0, y0], [x1 - 1, y1 - 1]]
    points, labels = {
        "box": (box, BOX),
        "click": ([centre], CLICK),
        "box+click": (box + [centre], BOX + CLICK),
        "clicks": ([centre, [x0, y1 + 1]], [1, 0]),  # a positive inside and a negative just below
    }[kind]
    points = (torch.tensor(points, dtype=torch.float32) + 0.5) * SCALE - 0.5
    pad = 3 - len(labels)
    return torch.cat([points, torch.zeros(pad, 2)]), torch.tensor(labels + [PAD_LABEL] * pad)


def hand_batch():
    """Two images x four regions for the tiny model: box, click, box + click, two clicks, and padding."""
    g = torch.Generator().manual_seed(0)
    b, k = len(REGIONS), len(REGIONS[0])
    batch = {
        "pixel_values": torch.rand(b, 3, SIDE * SCALE, SIDE * SCALE, generator=g),
        "points": torch.rand(b, k, 3, 2, generator=g) * SIDE * SCALE,  # garbage where padded
        "point_labels": torch.randint(0, 4, (b, k, 3), generator=g),
        "targets": torch.rand(b, k, SIDE, SIDE, generator=g) > 0.5,
        "region_valid": torch.zeros(b, k, dtype=torch.bool),
    }
    for i, row in enumerate(REGIONS):
        for j, region in enumerate(row):
            if region is None:
                continue
            rect, kind = region
            y0, y1, x0, x1 = rect
            batch["points"][i, j], batch["point_labels"][i, j] = _prompt(rect, kind)
            batch["targets"][i, j] = False
            batch["targets"][i, j, y0:y1, x0:x1] = True
            batch["region_valid"][i, j] = True
    return batch


def tiny_model(seed=0) -> SamModel:
    torch.manual_seed(seed)
    return SamModel(tiny_sam_config()).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def phantom_slices():
    """Organ names and four prepared phantom slices (dataset rows + sample_id), as a DataLoader yields them."""
    dataset = phantom_dataset(1, shape=(8, 160, 160))
    rows = dataset["train"]
    return read_metadata(dataset)["organ_names"], [dict(rows[i], sample_id=i) for i in range(2, 6)]


@pytest.fixture(scope="module")
def litemedsam_lora():
    return apply_lora(load_base_model("litemedsam"), "decoder", r=8, verbose=False)


# --- the single-region baseline is the same computation ------------------------------------------


@pytest.mark.parametrize("regions_per_forward", [1, 3])
@torch.no_grad()
def test_single_region_baseline_equals_multi_region(tiny, regions_per_forward):
    """Decoder rows are independent, so chunking the regions (1 per forward, or 3 + 1) changes nothing."""
    batch = hand_batch()
    multi = phpg_forward(tiny, batch, rounds=3, random_clicks=False)
    chunked = phpg_forward(tiny, batch, rounds=3, random_clicks=False, regions_per_forward=regions_per_forward)
    torch.testing.assert_close(chunked.low_res_logits, multi.low_res_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked.region_losses, multi.region_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.region_dice, multi.region_dice)
    torch.testing.assert_close(chunked.loss, multi.loss, atol=1e-5, rtol=1e-5)


# --- padding ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_padded_regions_never_contribute(tiny):
    batch = hand_batch()
    out = phpg_forward(tiny, batch, rounds=2, random_clicks=False)
    valid = batch["region_valid"]
    changed = hand_batch()
    g = torch.Generator().manual_seed(1)
    changed["targets"][~valid] = torch.rand(changed["targets"][~valid].shape, generator=g) > 0.2
    changed["points"][~valid] = torch.rand(changed["points"][~valid].shape, generator=g) * SIDE * SCALE
    changed["point_labels"][~valid] = torch.tensor([2, 3, 1])
    other = phpg_forward(tiny, changed, rounds=2, random_clicks=False)
    torch.testing.assert_close(other.loss, out.loss)
    torch.testing.assert_close(other.region_losses, out.region_losses)
    assert (out.region_losses[~valid] == 0).all() and (out.region_dice[~valid] == 0).all()
    assert (out.region_losses[valid] > 0).all()


def test_batch_without_organs_has_zero_loss_and_backward_works(litemedsam_lora, phantom_slices):
    """Slices with no organ collate to one padded region each; through the real encoder the loss is exactly 0."""
    organ_names, items = phantom_slices
    empty = [dict(item, label=np.zeros_like(np.asarray(item["label"]))) for item in items[:1]]
    batch = PHPGCollator(processor_for(litemedsam_lora), organ_names)(empty)
    assert batch["region_valid"].shape == (1, 1) and not batch["region_valid"].any()
    out = phpg_forward(litemedsam_lora, batch, rounds=2)
    assert out.loss.item() == 0.0 and (out.region_losses == 0).all()
    litemedsam_lora.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in litemedsam_lora.parameters() if p.requires_grad]
    assert grads and all(g is not None and (g == 0).all() for g in grads)
    litemedsam_lora.zero_grad()


# --- gradients ---------------------------------------------------------------------------------------


def test_gradients_reach_lora_and_trained_iou_head():
    model = apply_lora(tiny_model(), "encoder+decoder", r=4, train_heads=("iou",), verbose=False)
    phpg_forward(model, hand_batch(), rounds=2).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora_b = [n for n in trainable if "lora_B" in n]  # lora_A gets no gradient while B is still zero
    iou_head = [n for n in trainable if "iou_prediction_head.modules_to_save" in n]
    assert any("vision_encoder" in n for n in lora_b) and any("mask_decoder.transformer" in n for n in lora_b)
    assert iou_head
    for name in lora_b + iou_head:
        assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_checkpointed_rounds_give_the_same_loss_and_gradients():
    """Recomputing each round in backward (memory flat in rounds) is the same computation as keeping it."""
    results = []
    for recompute in (False, True):
        model = apply_lora(tiny_model(), "encoder+decoder", r=4, train_heads=("iou",), verbose=False)
        for name, p in model.named_parameters():  # non-zero B, so lora_A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        out = phpg_forward(model, hand_batch(), rounds=3, generator=torch.Generator().manual_seed(3),
                           checkpoint_rounds=recompute)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((out.loss.detach(), grads))
    (plain_loss, plain), (recomputed_loss, recomputed) = results
    torch.testing.assert_close(recomputed_loss, plain_loss)
    assert plain.keys() == recomputed.keys() and any("lora_A" in n and "vision_encoder" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_cached_embeddings_leave_the_encoder_without_gradient():
    model = apply_lora(tiny_model(), "encoder+decoder", r=4, verbose=False)
    batch = hand_batch()
    with torch.no_grad():
        embeddings = encode_images(model, batch["pixel_values"])
    phpg_forward(model, batch, rounds=1, image_embeddings=embeddings).loss.backward()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert (p.grad is None) == ("vision_encoder" in name), name


# --- CBDP sample weights ------------------------------------------------------------------------------


@torch.no_grad()
def test_sample_weights_scale_each_samples_loss(tiny):
    """loss = sum_b w_b * sum_k region_loss_bk / #valid regions: kept samples are up-weighted, not renormalised."""
    batch = hand_batch()
    plain = phpg_forward(tiny, batch, rounds=2, random_clicks=False)
    weights = torch.tensor([0.5, 3.0])
    weighted = phpg_forward(tiny, batch, rounds=2, random_clicks=False, sample_weights=weights)
    n_valid = batch["region_valid"].sum()
    torch.testing.assert_close(plain.loss, plain.region_losses.sum() / n_valid)
    torch.testing.assert_close(weighted.loss, (weights[:, None] * plain.region_losses).sum() / n_valid)
    torch.testing.assert_close(weighted.region_losses, plain.region_losses)  # CBDP scores stay unweighted
    doubled = phpg_forward(tiny, batch, rounds=2, random_clicks=False, sample_weights=2 * weights)
    torch.testing.assert_close(doubled.loss, 2 * weighted.loss)


# --- refinement rounds ------------------------------------------------------------------------------


def constant_prediction_model(sign: float) -> SamModel:
    """The tiny model made to predict the same logit (sign * ~3.4) at every pixel for every prompt."""
    model = tiny_model()
    decoder = model.mask_decoder
    with torch.no_grad():
        decoder.upscale_conv2.weight.zero_()
        decoder.upscale_conv2.bias.fill_(1.0)
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.zero_()
            mlp.proj_out.bias.fill_(sign)
    return model


@pytest.mark.parametrize("sign", [-1.0, 1.0], ids=["empty-prediction", "full-prediction"])
@torch.no_grad()
def test_refinement_clicks_go_where_the_prediction_is_wrong(sign):
    """Region 0's error is a 5x5 square (FN under an empty prediction, FP under a full one): every round adds
    a click at its centre, positive or negative; region 1 is already perfect and gets padding tokens. The
    previous round's logits come back as the mask prompt."""
    model = constant_prediction_model(sign)
    square = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    square[9:14, 20:25] = True
    full = sign > 0
    box_points, box_labels = _prompt((8, 15, 19, 26), "box")
    batch = {
        "pixel_values": torch.rand(1, 3, SIDE * SCALE, SIDE * SCALE),
        "points": box_points[None, None, :2].expand(1, 2, 2, 2),
        "point_labels": box_labels[None, None, :2].expand(1, 2, 2),
        "targets": torch.stack([square ^ full, torch.full_like(square, full)])[None],
        "region_valid": torch.ones(1, 2, dtype=torch.bool),
    }
    calls = []
    model.mask_decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    embeddings = encode_images(model, batch["pixel_values"])
    first_logits = decode_regions(model, embeddings, batch["points"], batch["point_labels"])[0][:, :, 0]
    assert ((first_logits > 0) == full).all()
    click = (torch.tensor([22.0, 11.0]) + 0.5) * SCALE - 0.5  # the square's centre in the model-input frame
    for rounds in (1, 2, 3):
        calls.clear()
        phpg_forward(model, batch, rounds=rounds, random_clicks=False)
        n = rounds - 1
        points = torch.cat([batch["points"], click.expand(1, 2, n, 2)], dim=2)
        labels = torch.cat([batch["point_labels"], torch.tensor([[[int(not full)] * n, [PAD_LABEL] * n]])], dim=2)
        # SAM's layout per region: padding is dropped, so the perfect region 1 keeps just its box and is
        # decoded in its own call (regions are grouped by token count) once region 0 has clicks.
        region0 = embed_prompt_tokens(model, points[0, :1], labels[0, :1])
        region1 = embed_prompt_tokens(model, batch["points"][0, 1:], batch["point_labels"][0, 1:])
        final = calls[-1:] if n == 0 else calls[-2:]
        expected = [torch.cat([region0, region1])] if n == 0 else [region1, region0]
        for call, tokens in zip(final, expected):
            torch.testing.assert_close(call["sparse_prompt_embeddings"][:, 0], tokens)
        if rounds > 1:
            dense = model.prompt_encoder.mask_embed(first_logits.reshape(2, 1, SIDE, SIDE))
            torch.testing.assert_close(final[0]["dense_prompt_embeddings"], dense[1:])
            torch.testing.assert_close(final[1]["dense_prompt_embeddings"], dense[:1])


def test_training_clicks_are_reproducible_with_a_generator(tiny):
    batch = hand_batch()
    with torch.no_grad():
        first, second = (phpg_forward(tiny, batch, rounds=3, generator=torch.Generator().manual_seed(5))
                         for _ in range(2))
    torch.testing.assert_close(first.low_res_logits, second.low_res_logits)
    torch.testing.assert_close(first.loss, second.loss)


def test_step_module_draws_random_clicks_only_in_training():
    model, batch = tiny_model(), hand_batch()
    step = PHPGStep(model, rounds=3, regions_per_forward=2)
    with torch.no_grad():
        evaluated = step.eval()(batch)
        trained = step.train()(batch, generator=torch.Generator().manual_seed(5))
        expected = phpg_forward(model, batch, rounds=3, random_clicks=True, generator=torch.Generator().manual_seed(5),
                                regions_per_forward=2)
        deterministic = phpg_forward(model, batch, rounds=3, random_clicks=False, regions_per_forward=2)
    torch.testing.assert_close(evaluated.low_res_logits, deterministic.low_res_logits)
    torch.testing.assert_close(trained.low_res_logits, expected.low_res_logits)
    assert not torch.equal(trained.low_res_logits, evaluated.low_res_logits)


def test_rounds_must_be_positive(tiny):
    with pytest.raises(ValueError, match="rounds"):
        phpg_forward(tiny, hand_batch(), rounds=0)


# --- multimask for single clicks -----------------------------------------------------------------------


@torch.no_grad()
def test_single_click_regions_use_the_iou_chosen_multimask(litemedsam_lora, phantom_slices):
    """Boxes, single clicks and multi-click prompts in one collated batch: single-click regions take the
    multimask output the IoU head ranks first and the best of the three masks' losses; the others the
    single-mask output."""
    organ_names, items = phantom_slices
    collator = PHPGCollator(processor_for(litemedsam_lora), organ_names, max_regions=4,
                            behaviours={"tight_box": 1, "center_click": 2, "multi_click": 1})
    batch = collator(items[2:3])
    valid, labels = batch["region_valid"], batch["point_labels"]
    single = is_single_click(labels) & valid
    assert single.any() and (~single & valid).any()
    embeddings = encode_images(litemedsam_lora, batch["pixel_values"])
    out = phpg_forward(litemedsam_lora, batch, rounds=1, image_embeddings=embeddings, random_clicks=False)
    targets = batch["targets"]
    one, one_iou = decode_regions(litemedsam_lora, embeddings, batch["points"], labels)
    three, three_iou = decode_regions(litemedsam_lora, embeddings, batch["points"], labels, multimask_output=True)
    chosen = torch.take_along_dim(three, three_iou.argmax(-1)[..., None, None, None], dim=2)[:, :, 0]
    # rows are decoded in differently composed groups here and there: float sums differ in the last bits
    torch.testing.assert_close(out.low_res_logits[single], chosen[single], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.low_res_logits[~single], one[:, :, 0][~single], atol=1e-4, rtol=1e-4)
    multi_targets = targets[:, :, None].expand_as(three)
    best = segmentation_loss(three, multi_targets).min(-1).values
    iou_mse = (three_iou - hard_iou(three, multi_targets)).square().mean(-1)
    torch.testing.assert_close(out.region_losses[single], (best + iou_mse)[single], atol=1e-5, rtol=1e-5)
    one_loss = segmentation_loss(one[:, :, 0], targets) + (one_iou[:, :, 0] - hard_iou(one[:, :, 0], targets)).square()
    torch.testing.assert_close(out.region_losses[~single & valid], one_loss[~single & valid], atol=1e-5, rtol=1e-5)


# --- learning ------------------------------------------------------------------------------------------


def test_adamw_steps_learn_click_prompts(phantom_slices):
    """LiteMedSAM + decoder LoRA on a fixed batch of centre clicks: a few AdamW steps must lower the loss and
    raise the Dice. LiteMedSAM was trained on boxes and answers a single click with an almost empty mask, so
    the hypernetwork heads train too: with LoRA alone the first steps only sharpen the empty mask."""
    organ_names, items = phantom_slices
    torch.manual_seed(0)  # LoRA's A matrices
    model = apply_lora(load_base_model("litemedsam"), "decoder", r=8, train_heads=("hypernetworks",), verbose=False)
    collator = PHPGCollator(processor_for(model), organ_names, behaviours=["center_click"], max_regions=2)
    batch = collator(items[:2])
    valid = batch["region_valid"]
    with torch.no_grad():  # the encoder is frozen under the decoder preset: encode once
        embeddings = encode_images(model, batch["pixel_values"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, dice = [], []
    for _ in range(6):
        out = phpg_forward(model, batch, rounds=1, image_embeddings=embeddings)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        dice.append(out.region_dice[valid].mean().item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert dice[-1] > dice[0] + 0.2, dice
