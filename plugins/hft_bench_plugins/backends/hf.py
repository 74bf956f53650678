"""Batched greedy generation with transformers: left padding, length-sorted batches, KV cache, stop at EOS."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import Progress

from harmbench_ft import Backend, ServedModel


class HFBackend(Backend):
    name = "hf"

    def generate(self, served: ServedModel, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
        model, tokenizer = served.model, served.tokenizer
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        # Sorting by length keeps padding (wasted compute) small; outputs go back in input order.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        pad = tokenizer.pad_token_id
        model.eval()
        with Progress(transient=True, console=Console(stderr=True)) as progress, torch.inference_mode():
            bar = progress.add_task(f"generating ({max_new_tokens} new tokens)", total=len(prompts))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                attention = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                    use_cache=True,
                )
                for row, i in enumerate(idx):
                    outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
                progress.advance(bar, len(idx))
        return outputs
