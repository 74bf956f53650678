"""Weight restoration with rollback (post-fine-tuning): put a few fine-tuned weights back to their aligned values.

Yang, Tao, Chen, Xu, "Alleviating the Fear of Losing Alignment in LLM Fine-tuning", IEEE S&P 2025; reference code
kangyangWHU/LLMAlignment (`sgdg_rollback_final.py` class AlignParamRollback, `run_recover_exp.py`,
`utils/constant.py`, `utils/model_utils.py`, `utils/inference_utils.py`, `run_eval_exp.py` eval_all_steps,
`utils/res_utils.py` get_largest_step); protocol.md section 3, "Weight restoration with rollback".

The edit works on full weights: W_f = the fine-tuned model merged (ctx.merged_model()), W_a = the aligned model
(ctx.aligned_weights()); the result is a full model (ctx.keep_full_weights). Every element of the result holds
either its W_f or its W_a value.

1. The truncated model: decoder blocks 0..layer_end−1; its output is the hidden state leaving block layer_end−1,
   with no final norm and no head (model_utils.truncate_auto_model replaces norm and lm_head by identities and
   inference_utils.get_hidden_states reads hidden_states[layer_end]: the same tensor). Here a forward hook on
   block layer_end−1 stops the forward there, which finds the blocks on any architecture (layers.decoder_layers).
   The state of a prompt is that of its last token (`rep = -1`).
2. Directions, once: d_h = mean state of the ALIGNED model over the harmful prompts, d_b = mean state of the
   FINE-TUNED model over the benign prompts (sgdg_rollback_final.direction_helper: the mean over all prompts).
3. Restorable: every weight matrix (2-D parameter) of blocks 0..layer_end−1; no norms, no embeddings, no head.
4. Recovery step: over the harmful prompts in batches of `batch_size`, loss_b = −cos(mean state of batch b, d_h),
   each backpropagated, the gradients summed (optimize_param). An element is kept only if a descent step moves it
   toward W_a: (W − W_a > 0 and g > 0) or (W − W_a < 0 and g < 0) (get_select_mask; an element already at W_a is
   never kept). k = ceil(recovery_rate × the number of elements of all hidden-layer weight matrices of the FULL
   model, all L blocks); the k kept elements of largest |g|, ranked together across all restorable matrices (one
   global top-k, find_threshold), get their W_a value: a copy, no optimiser (recover_param).
5. Rollback: after `warmup_steps` recovery steps the task score is measured; below (1 − metric_drop) × the
   fine-tuned model's score, the run restarts from W_f and every recovery step is followed by a rollback step:
   gradient of Σ_b −cos(mean benign state of batch b, d_b) at the weights just restored; among the elements
   restored in THAT step whose gradient points back toward W_f ((W − W_f > 0 and g > 0) or (W − W_f < 0 and
   g < 0)), the ceil(rollback_rate × their number) of largest |g| get their W_f value back.
6. Final model: checkpoints every `save_every` steps up to `steps` (without rollback the warm-up model is the first
   one); the kept one is the last checkpoint before the first whose task score is ≤ (1 − metric_drop) × the
   fine-tuned score (eval_all_steps + get_largest_step); if the first checkpoint already fails, W_f is kept
   unchanged (the reference records no result then).

Follows the reference (choices the protocol leaves open):
- Gradients accumulate across recovery steps, as in the reference: AlignParamRollback.reset_weights zeroes them
  only around a rollback step, and on several GPUs saves and re-adds them across steps (get_grad/add_grad; its
  earlier result folders are named `recover_pgd_acc_grad_select`). So without rollback step t ranks Σ_{s≤t} g_s,
  each g_s taken at the weights of step s; with rollback every recovery step uses its own gradient.
- A step runs over min(#harmful batches, #benign batches) batches of each set: optimize_param zips the two loaders.
  At the defaults (256 harmful, 256 benign prompts, batch 8) that is all 32 of each.
- The same `recovery_size` caps both prompt sets (get_dataloader's n_limit); the first rows are taken, unshuffled.
- Prompts are tokenised without special tokens (get_llm_data_loader: add_special_tokens=False), rendered with the
  suite's template (e.prompt: the rendered prompt without the answer), as the model was fine-tuned.
- The rollback restart discards the warm-up steps; its checkpoints are steps save_every, 2·save_every, … of the
  restarted run (the reference moves its work_path into a sub-folder, so the warm-up checkpoint is not a candidate).
- The warm-up check is strict (score < minimum triggers rollback), the checkpoint check is not (score ≤ minimum
  stops), as in run() and eval_all_steps.

Deviations (deliberate):
- Checkpoint selection and the rollback trigger score the task on ctx.task_validation, 256 rows held out from the
  task's training rows; the reference scores the task's test file (get_metric_score), which protocol.md fixes.
- The benign prompts are ctx.task_validation's, not the first 256 rows of the task's train.jsonl (rows the
  fine-tune saw); the suite gives an edit no training rows.
- Exactly k elements are restored (and exactly ceil(rollback_rate·n) rolled back), as protocol.md says; the
  reference's find_threshold takes the k-th largest |g| as a threshold and get_threshold_mask keeps |g| > it
  strictly, so it restores k − 1 (fewer on ties). When fewer than k elements qualify, all of them are restored, and
  an empty rollback candidate set rolls nothing back (the reference's torch.topk fails in both cases).
- Restorable and counted tensors are the blocks' weight matrices only (protocol.md). The reference's name filter
  (skip "layernorm", keep `name.split(".")[2]` integers) also restores 1-D biases (Qwen2's q/k/v) and norms not
  named "layernorm" (Qwen3's q_norm), and get_total_param counts every parameter of the blocks, norms and biases
  included: for SmolLM2-135M that adds 2·576 norm elements to ~3.3M per block, < 0.04% of k.
- The model runs in eval mode (the reference calls .train(); its models have no dropout active, so no difference).
- Batches are right-padded and each row's last real token is read; the reference left-pads and reads position
  −1 with positions counted from the padding (RoPE is relative, so the states agree up to rounding).
- d_b is computed for this model and layer_end each time; the reference caches it per task only
  (direction/{task}/true_benign_direction.pt), so a cached file from another layer_end would be reused.
- Checkpoints are scored as they are reached and the run stops at the first failing one: later checkpoints can
  never be kept, so the result is the same with fewer task evaluations. A checkpoint is kept in memory as the
  positions and values of the elements that differ from W_f (restored ones), not as a saved model.

Defaults are run_recover_exp.py's: recovery_rate 0.002 (`sparsity`), rollback_rate 0.2, steps 20, save_every 5,
warmup 5, batch 8, metric_drop 0.05, recovery_size 256. The shipped data file it reads
(dataset/BeaverTails/select_256.jsonl) holds only 64 prompts, so the reference run in effect used 64 harmful prompts
and, through the zip, the first 64 benign ones per step (d_b still over 256); recovery_size=64 reproduces that
except that d_b then averages 64 benign prompts. layer_end defaults to
⌊2L/3⌋, the ratio of constant.py's layer_end_mapping (Llama-2-7B 21 of 32, Gemma-2B 12 of 18, Llama-3.2-3B 18 of
28, Llama-2-13B 26 of 40), also sgdg_rollback_final.py's own __main__ (⌊4L/6⌋); run_recover_exp.py's loop offers
⌊2L/6⌋…⌊5L/6⌋ with only ⌊2L/6⌋ left uncommented. At least 1. For SmolLM2-135M (30 blocks) ⌊2L/3⌋ = 20.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harmbench_ft import Defense, PostContext, Stage, UsageError, hookimpl, layers


@dataclass
class Params:
    # Share of the full model's hidden-layer weight elements restored per step: run_recover_exp.py `sparsity = 0.002`.
    recovery_rate: float = 0.002
    # Share of a step's candidates (restored in that step, gradient back toward W_f) rolled back:
    # run_recover_exp.py `rollback_rate = 0.2`.
    rollback_rate: float = 0.2
    # Recovery steps in all: run_recover_exp.py `steps = 20`.
    steps: int = 20
    # A checkpoint every this many steps: run_recover_exp.py `save_step = 5`.
    save_every: int = 5
    # Recovery steps before the task check that decides rollback: run_recover_exp.py `warmup_steps = 5`.
    warmup_steps: int = 5
    # Prompts per forward/backward pass: run_recover_exp.py `batch_size = 8`.
    batch_size: int = 8
    # Allowed relative task drop (rollback trigger and checkpoint choice): run_recover_exp.py `metric_drop = 0.05`.
    metric_drop: float = 0.05
    # Prompts of each set, harmful and benign (the first rows): run_recover_exp.py `recovery_size = 256`; its
    # shipped select_256.jsonl holds 64 prompts, so 64 is what the reference run in effect used (module docstring).
    recovery_size: int = 256
    # Blocks 0..layer_end−1 are restorable and the states are read after block layer_end−1. None: ⌊2L/3⌋ for a
    # model of L blocks, the ratio of constant.py's layer_end_mapping (SmolLM2-135M: 20 of 30).
    layer_end: int | None = None
    # Whether the warm-up check may trigger rollback: AlignParamRollback(rollback_flag=True).
    rollback: bool = True

    def validate(self) -> None:
        defaults = Params()
        for name, low, high, low_open in (("recovery_rate", 0.0, 1.0, True), ("rollback_rate", 0.0, 1.0, False), ("metric_drop", 0.0, 1.0, False)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
                bound = f"{'>' if low_open else '>='} {low} and <= {high}"
                raise UsageError(f"restoration: {name}={value} is out of range; it must be a finite number {bound} (default {getattr(defaults, name)})")
        for name in ("steps", "save_every", "warmup_steps", "batch_size", "recovery_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise UsageError(f"restoration: {name}={value} is out of range; it must be an integer >= 1 (default {getattr(defaults, name)})")
        if self.warmup_steps > self.steps:
            raise UsageError(f"restoration: warmup_steps={self.warmup_steps} is out of range; it must be at most steps={self.steps} (default {defaults.warmup_steps})")
        if self.layer_end is not None and not (isinstance(self.layer_end, int) and not isinstance(self.layer_end, bool) and self.layer_end >= 1):
            raise UsageError(f"restoration: layer_end={self.layer_end} is out of range; it must be an integer >= 1 and at most the model's number of blocks (default none: ⌊2L/3⌋)")


class _Truncated(Exception):
    """Raised by the hook on block layer_end−1: the rest of the model is not run."""


def pad_batches(tokenizer, prompts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of prompts, with each row's last real position (the reference reads the last token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "last": torch.tensor([len(x) - 1 for x in ids])})
    return batches


def last_states(model: torch.nn.Module, block: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, hidden): each prompt's last-token state leaving `block`; the blocks after it, the final norm and the
    head are not run, as in the reference's truncated model."""
    captured: list[torch.Tensor] = []

    def stop(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Truncated

    device = next(model.parameters()).device
    handle = block.register_forward_hook(stop)
    try:
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    except _Truncated:
        pass
    finally:
        handle.remove()
    states = captured[0]
    return states[torch.arange(states.shape[0], device=states.device), batch["last"].to(states.device)]


def mean_state(model, block, batches) -> torch.Tensor:
    """A reference direction: the mean last-token state over every prompt of `batches` (computed once, no graph)."""
    with torch.no_grad():
        return torch.cat([last_states(model, block, b) for b in batches]).mean(dim=0)


def accumulate_gradient(model, block, batches, direction: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Add to each weight's .grad the gradient of Σ_b −cos(mean state of batch b, direction): one backward a batch,
    as the reference's optimize_param. Gradients exist only for `weights`; the caller clears them."""
    with torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        try:
            for b in batches:
                loss = -F.cosine_similarity(last_states(model, block, b).mean(dim=0), direction, dim=0)
                loss.backward()
        finally:
            for w in weights:
                w.requires_grad_(False)


def toward(w: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Elements a descent step (−grad) moves toward `target`: the gradient has the sign of w − target, both non-zero."""
    diff = w - target
    return ((diff > 0) & (grad > 0)) | ((diff < 0) & (grad < 0))


def global_top_k(grads: list[torch.Tensor], candidates: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Masks of the k candidate elements of largest |grad|, ranked together across all tensors (one top-k)."""
    sizes = [g.numel() for g in grads]
    flat = torch.empty(sum(sizes), dtype=grads[0].dtype, device=grads[0].device)  # filled a tensor at a time
    for part, g, c in zip(flat.split(sizes), grads, candidates, strict=True):
        part.copy_(torch.where(c, g.abs(), -1.0).view(-1))  # non-candidates rank below every |grad|
    k = min(k, int(sum(int(c.sum()) for c in candidates)))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        chosen[flat.topk(k).indices] = True
    return [m.view(g.shape) for m, g in zip(chosen.split(sizes), grads, strict=True)]


def clear_grads(weights: list[torch.Tensor]) -> None:
    for w in weights:
        w.grad = None


def snapshot(weights: list[torch.Tensor], fine_tuned: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A checkpoint: where each weight differs from W_f and its values there; few elements, so smaller than a mask."""
    out = []
    for w, f in zip(weights, fine_tuned, strict=True):
        index = (w != f).view(-1).nonzero().squeeze(1)
        out.append((index, w.view(-1)[index].clone()))
    return out


def grad_of(w: torch.Tensor) -> torch.Tensor:
    """A weight's gradient; zero where the loss does not reach it."""
    return w.grad if w.grad is not None else torch.zeros_like(w)


class Restoration(Defense):
    name = "restoration"
    description = (
        "Restore the fine-tuned weights whose gradient most pulls harmful-prompt states back toward the aligned model's "
        "to their aligned values, with rollback toward the task (Yang et al., S&P 2025); full weights; per step a "
        "forward+backward over the prompts through the first 2/3 of the blocks (twice with rollback), plus up to 6 task evaluations."
    )
    stages = (Stage.POST_FINETUNE,)
    post_needs = ("harmful", "task_validation")
    Params = Params

    def post_finetune(self, ctx: PostContext) -> dict[str, Any]:
        p = self.params
        if not ctx.harmful:
            raise UsageError("restoration: needs the provider's harmful prompts (PostContext.harmful is empty); set alignment.n_harmful >= 1")
        if not ctx.task_validation:
            raise UsageError("restoration: needs held-out task rows (PostContext.task_validation is empty: the task's train split has no room beside the upload, or its end holds alignment.n_benign rows)")
        model = ctx.merged_model()
        model.eval()
        blocks = layers.decoder_layers(model)
        n_layers = len(blocks)
        layer_end = p.layer_end if p.layer_end is not None else max(1, (2 * n_layers) // 3)
        if not 1 <= layer_end <= n_layers:
            raise UsageError(f"restoration: layer_end={layer_end} is out of range; this model has {n_layers} blocks, so it must be in 1..{n_layers} (default none: ⌊2L/3⌋ = {max(1, 2 * n_layers // 3)})")
        cut = blocks[layer_end - 1]

        module_name = {id(m): n for n, m in model.named_modules()}
        names, weights, layer_of = [], [], []
        for i, block in enumerate(blocks[:layer_end]):
            for n, w in block.named_parameters():
                if w.dim() == 2:
                    names.append(f"{module_name[id(block)]}.{n}")
                    weights.append(w)
                    layer_of.append(i)
        n_hidden = sum(w.numel() for block in blocks for w in block.parameters() if w.dim() == 2)
        k = math.ceil(n_hidden * p.recovery_rate)

        harmful = pad_batches(ctx.tokenizer, [e.prompt for e in ctx.harmful[: p.recovery_size]], p.batch_size)
        benign = pad_batches(ctx.tokenizer, [e.prompt for e, _ in ctx.task_validation[: p.recovery_size]], p.batch_size)
        n_batches = min(len(harmful), len(benign))  # the reference zips the two loaders

        fine_tuned = [w.detach().clone() for w in weights]
        aligned_all = ctx.aligned_weights()
        missing = [n for n in names if n not in aligned_all]
        if missing:
            raise UsageError(f"restoration: the aligned weights lack {missing[:3]}; they must be keyed like the plain model's state_dict()")
        aligned = [aligned_all[n].to(device=w.device, dtype=w.dtype) for n, w in zip(names, weights)]
        d_h = self._aligned_direction(model, blocks[layer_end:], cut, harmful, aligned_all)
        del aligned_all
        d_b = mean_state(model, cut, benign)

        finetuned_score = float(ctx.task_score(model, ctx.task_validation))
        minimum = finetuned_score - finetuned_score * p.metric_drop
        ctx.report_progress(f"fine-tuned task score {finetuned_score:.1f} on {len(ctx.task_validation)} held-out rows; checkpoints must stay above {minimum:.1f}")

        def recover() -> list[torch.Tensor]:
            accumulate_gradient(model, cut, harmful[:n_batches], d_h, weights)  # on top of earlier steps' gradients
            grads = [grad_of(w) for w in weights]
            keep = [toward(w, a, g) for w, a, g in zip(weights, aligned, grads)]
            chosen = global_top_k(grads, keep, k)
            for w, a, c in zip(weights, aligned, chosen):
                w[c] = a[c]
            return chosen

        def roll_back(restored: list[torch.Tensor]) -> int:
            clear_grads(weights)
            accumulate_gradient(model, cut, benign[:n_batches], d_b, weights)
            grads = [grad_of(w) for w in weights]
            back = [r & toward(w, f, g) for r, w, f, g in zip(restored, weights, fine_tuned, grads)]
            n_back = math.ceil(p.rollback_rate * sum(int(b.sum()) for b in back))
            chosen = global_top_k(grads, back, n_back)
            for w, f, c in zip(weights, fine_tuned, chosen):
                w[c] = f[c]
            clear_grads(weights)
            return sum(int(c.sum()) for c in chosen)

        restored_per_step, rolled_back_per_step = [], []  # elements per step run (after a restart: of the restarted run)
        for _ in range(p.warmup_steps):
            restored_per_step.append(sum(int(c.sum()) for c in recover()))
            rolled_back_per_step.append(0)
        warmup_score = float(ctx.task_score(model, ctx.task_validation))
        rolled = p.rollback and warmup_score < minimum
        ctx.report_progress(f"{p.warmup_steps} warm-up steps: task score {warmup_score:.1f}" + ("; rollback on, restarting from the fine-tuned weights" if rolled else ""))

        scores: dict[str, float] = {}
        kept_step, kept = 0, snapshot(fine_tuned, fine_tuned)  # step 0: W_f, the fine-tuned model unchanged

        def checkpoint(step: int, score: float) -> bool:
            """Record a checkpoint's score; keep it while the task holds, and say whether to go on."""
            nonlocal kept_step, kept
            scores[str(step)] = score
            if score <= minimum:
                return False
            kept_step, kept = step, snapshot(weights, fine_tuned)
            return True

        discarded = []
        if rolled:  # restart from W_f; the warm-up steps are discarded
            clear_grads(weights)
            for w, f in zip(weights, fine_tuned):
                w.copy_(f)
            discarded, restored_per_step, rolled_back_per_step = restored_per_step, [], []
            start, going = 0, True
        else:
            start, going = p.warmup_steps, checkpoint(p.warmup_steps, warmup_score)
        steps_run = start
        for step in range(start, p.steps) if going else ():
            restored = recover()
            restored_per_step.append(sum(int(c.sum()) for c in restored))
            rolled_back_per_step.append(roll_back(restored) if rolled else 0)
            steps_run = step + 1
            if (step + 1) % p.save_every == 0:
                going = checkpoint(step + 1, float(ctx.task_score(model, ctx.task_validation)))
                ctx.report_progress(f"step {step + 1}/{p.steps}: task score {scores[str(step + 1)]:.1f}" + ("" if going else ", at or below the limit: stopping"))
                if not going:
                    break  # a later checkpoint can never be kept
        clear_grads(weights)

        per_layer = {str(i): 0 for i in range(layer_end)}
        for w, f, (index, values), i in zip(weights, fine_tuned, kept, layer_of):
            w.copy_(f)
            w.view(-1)[index] = values
            per_layer[str(i)] += index.numel()
        ctx.keep_full_weights(model)
        return {
            "recovery_rate": p.recovery_rate,
            "rollback_rate": p.rollback_rate,
            "metric_drop": p.metric_drop,
            "layer_end": layer_end,
            "n_layers": n_layers,
            "hidden_elements": n_hidden,
            "restorable_elements": sum(w.numel() for w in weights),
            "k_per_step": k,
            "n_harmful_prompts": min(len(ctx.harmful), p.recovery_size),
            "n_benign_prompts": min(len(ctx.task_validation), p.recovery_size),
            "batches_per_step": n_batches,
            "selected_on": "task_validation",
            "finetuned_score": finetuned_score,
            "minimum_score": minimum,
            "warmup_score": warmup_score,
            "rollback": rolled,
            "warmup_restored_per_step": discarded,  # the warm-up steps a rollback discarded
            "steps_run": steps_run,
            "restored_per_step": restored_per_step,
            "rolled_back_per_step": rolled_back_per_step,
            "checkpoint_scores": scores,
            "kept_step": kept_step,
            "restored_per_layer": per_layer,
            "restored_total": sum(per_layer.values()),
            "rolled_back_total": sum(rolled_back_per_step[:kept_step]),
        }

    @staticmethod
    def _aligned_direction(model, later_blocks, cut, harmful, aligned_all: dict[str, torch.Tensor]) -> torch.Tensor:
        """d_h: the ALIGNED model's mean state over the harmful prompts. Its weights are loaded into every parameter the
        truncated forward can use (all but the blocks after the cut) and the fine-tuned ones put back afterwards."""
        unused = {id(w) for block in later_blocks for w in block.parameters()}
        saved = []
        for name, w in model.named_parameters():
            if id(w) in unused or name not in aligned_all:
                continue
            a = aligned_all[name].to(device=w.device, dtype=w.dtype)
            if not torch.equal(w, a):
                saved.append((w, w.detach().clone()))
                w.copy_(a)
        try:
            return mean_state(model, cut, harmful)
        finally:
            for w, value in saved:
                w.copy_(value)


@hookimpl
def hft_register_defenses(register):
    register(Restoration)
