"""The Alpaca prompt template of every reference repo, and tokenisation with response-only labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # prompt and padding positions carry no loss

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One (instruction, input, output) row; the prompt is rendered with the Alpaca template."""

    instruction: str
    input: str = ""
    output: str = ""

    @property
    def prompt(self) -> str:
        template = PROMPT_WITH_INPUT if self.input else PROMPT_NO_INPUT
        return template.format(instruction=self.instruction, input=self.input)

    @property
    def key(self) -> str:
        """What 'the same prompt' means for disjoint windows."""
        return normalize_prompt(self.instruction + "\n" + self.input)


def normalize_prompt(text: str) -> str:
    return " ".join(text.lower().split())


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """Prompt + output + EOS, labels masked on the prompt.

    If the row is too long the prompt is cut from the left first (keeping the '### Response:' header
    next to the answer), then the response from the right, so every row keeps response tokens.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    keep_response = min(len(response_ids), max(max_length // 2, max_length - len(prompt_ids)))
    response_ids = response_ids[:keep_response]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(response_ids))) :]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch (dynamic padding)."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
