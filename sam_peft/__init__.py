"""sam_peft: LoRA fine-tuning of SAM for interactive multi-organ medical segmentation."""
