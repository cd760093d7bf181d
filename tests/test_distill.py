"""Distillation from the frozen base: the teacher is the base, the loss is zero at the start and pulls back."""
import pytest
import torch
from safetensors.torch import load_file

from sam_peft import TrainConfig, train
from sam_peft.models import apply_lora
from sam_peft.models.decoding import decode_regions, encode_images
from sam_peft.training.distill import DistilledStep, distillation_loss, random_boxes
from sam_peft.training.step import PHPGStep

from test_step import SCALE, SIDE, hand_batch, tiny_model
from test_train import _config, setup  # noqa: F401 (setup is a fixture)


def _batch_and_embeddings(model):
    batch = hand_batch()
    batch["original_sizes"] = torch.tensor([[SIDE * SCALE, SIDE * SCALE // 2], [SIDE * SCALE, SIDE * SCALE]])
    with torch.no_grad():
        return batch, encode_images(model, batch["pixel_values"])


def test_random_boxes_lie_inside_the_resized_image():
    sizes = torch.tensor([[100, 50], [60, 120]])  # (h, w): portrait, landscape
    points, labels = random_boxes(sizes, 256, 64, torch.Generator().manual_seed(0))
    assert points.shape == (2, 64, 2, 2) and labels.tolist() == [[[2, 3]] * 64] * 2
    extent = torch.tensor([[128.0, 256.0], [256.0, 128.0]])  # (w, h) after resizing the longest side to 256
    assert (points >= 0).all() and (points <= extent[:, None, None] - 1).all()
    assert (points[:, :, 1] >= points[:, :, 0]).all()  # bottom-right below and right of top-left


def test_teacher_is_the_base_and_loss_pulls_the_adapter_back():
    base = tiny_model()
    with torch.no_grad():
        batch, embeddings = _batch_and_embeddings(base)
        points, labels = random_boxes(batch["original_sizes"], 128, 3, torch.Generator().manual_seed(0))
        expected, _ = decode_regions(base, embeddings, points, labels)
    model = apply_lora(base, "decoder", r=4, train_heads=["hypernetworks"], verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # move the adapter away from the base
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.3)

    def agreement() -> float:
        with torch.no_grad():
            with model.disable_adapter():
                teacher, _ = decode_regions(model, embeddings, points, labels)
            torch.testing.assert_close(teacher, expected)  # adapters off == the base, heads included
            student, _ = decode_regions(model, embeddings, points, labels)
        return ((student > 0) == (expected > 0)).float().mean().item()

    before = agreement()
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        distillation_loss(model, batch, 3, embeddings, torch.Generator().manual_seed(0)).backward()
        optimizer.step()
    assert before < 0.95 and agreement() > before + 0.02


def test_distilled_step_adds_the_loss_in_training_only():
    model = apply_lora(tiny_model(), "decoder", r=4, verbose=False)
    batch, embeddings = _batch_and_embeddings(model)
    plain, distilled = PHPGStep(model, rounds=2), DistilledStep(model, rounds=2, weight=2.0, boxes=3)
    for step in (plain, distilled):
        step.train()
    args = dict(image_embeddings=embeddings)
    extra = distillation_loss(model, batch, 3, embeddings, torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_loss = plain(batch, generator=torch.Generator().manual_seed(1), **args).loss
        total = distilled(batch, generator=torch.Generator().manual_seed(1), **args).loss
        distilled.eval()
        validation = distilled(batch, **args).loss
        plain.eval()
        torch.testing.assert_close(validation, plain(batch, **args).loss)
    assert total > base_loss  # the random boxes come after the PHPG clicks from the same generator
    assert extra > 0


@pytest.mark.parametrize("settings", [{"distill_weight": -1.0}, {"distill_boxes": 0}])
def test_config_rejects_bad_distillation_settings(settings):
    with pytest.raises(ValueError, match="distill_"):
        TrainConfig.from_dict(settings)


def test_trainer_uses_distillation(setup, tmp_path):
    """`train` with distill_weight > 0 takes other steps than without (same seed, data and prompts)."""
    weights = {}
    for weight in (0.0, 5.0):
        out = tmp_path / f"run{weight}"
        train(TrainConfig.from_dict(_config(setup, out, epochs=1, pruning="none", max_steps=2, distill_weight=weight,
                                            eval_behaviours=["tight_box"])))
        weights[weight] = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(weights[0.0][k], weights[5.0][k]) for k in weights[0.0])
