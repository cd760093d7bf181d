"""score_before_training: every region of every slice scored once, so a pruning sampler prunes epoch 0."""
import pytest
import torch
from transformers import SamModel

from sam_peft.data import phantom_dataset, read_metadata
from sam_peft.models import processor_for
from sam_peft.prompts import PHPGCollator
from sam_peft.pruning import CBDPSampler
from sam_peft.training.embedding_cache import encode_dataset
from sam_peft.training.warm_start import score_before_training
from test_models import tiny_sam_config


class Rows(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["image", "label"]).with_format("numpy")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[int(i)], "sample_id": int(i)}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SamModel(tiny_sam_config())
    data = phantom_dataset(2, seed=1, shape=(8, 64, 64), spacing=(3.0, 2.5, 2.5), min_pixels=20)
    train = data["train"]
    organs = [[o for o, n in zip(names, pixels) if n >= 20]
              for names, pixels in zip(train["organs"], train["organ_pixels"])]
    return model, train, organs, read_metadata(data)["organ_names"]


def test_scores_every_region_so_epoch_zero_prunes(setup):
    model, train, organs, organ_names = setup
    processor = processor_for(model)
    collator = PHPGCollator(processor, organ_names, behaviours=["tight_box", "center_click"], max_regions=1,
                            min_pixels=20, include_pixels=False)
    sampler = CBDPSampler(organs, num_epochs=4, budget="dataset")
    assert len(sampler) == len(organs)  # nothing scored: epoch 0 keeps everything
    model.train()
    embeddings = torch.from_numpy(encode_dataset(model, train, processor, progress=False))
    regions = score_before_training(model, Rows(train), collator, sampler, organ_names,
                                    image_embeddings=embeddings, batch_size=3, progress=False)
    assert regions == sum(min(len(o), 1) for o in organs)  # the collator's regions: max_regions 1
    assert model.training  # left as it was
    sampler.set_epoch(0)
    n = len(organs)
    assert len(sampler) == n - n // 2 and sampler.epoch_summary()["pruned"] == n // 2
    # the scores are the model's: the encoder run on the pixels gives the same plan
    pixel_collator = PHPGCollator(processor, organ_names, behaviours=["tight_box", "center_click"], max_regions=1,
                                  min_pixels=20)
    again = CBDPSampler(organs, num_epochs=4, budget="dataset")
    score_before_training(model, Rows(train), pixel_collator, again, organ_names, batch_size=5, progress=False)
    again.set_epoch(0)
    assert list(again) == list(sampler)
    with pytest.raises(ValueError, match="batch_size"):
        score_before_training(model, Rows(train), collator, sampler, organ_names, batch_size=0)
