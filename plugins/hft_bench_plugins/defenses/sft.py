"""SFT: no defense. Plain supervised fine-tuning at both stages (the baseline every table compares to)."""

from harmbench_ft import Defense, hookimpl


class SFT(Defense):
    name = "sft"
    description = "No defense: plain SFT alignment and plain SFT fine-tuning (AdamW, grad-clip 1.0)."
    stages = ()


@hookimpl
def hft_register_defenses(register):
    register(SFT)
