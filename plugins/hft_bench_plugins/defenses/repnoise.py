"""RepNoise (alignment stage): push harmful representations toward Gaussian noise while keeping refusals.

Loss on paired batches (protocol.md section 3), x_h = harmful prompt + harmful answer, x_s = the same
prompt + a safe answer:

    L = CE_retain(x_s) + β · mean_l MMD(mlp_out_l(x_h), N(0, I)) − α · log(H)
    H = (CE(final logits, x_h) + Σ_j CE(lm_head(norm(hidden_j)), x_h)) / (L + 1) + 1

Two variants, recorded in the run's arguments and tabulated apart:

``variant="original"`` (the default) is what the authors' code computes (domenicrosati/representation-noising,
``representation_noising/loss.py``, ``rep_noise_loss`` and ``masked_token_ce_loss``):
- the two micro-batches are right-padded to one width, and ONE mask ``m = ids(x_h) != ids(x_s)`` (the positions
  where the pair differs: the shared prompt drops out, padding facing a longer partner stays in) selects the
  tokens of every term;
- each CE is the reference's masked CE: logits at positions with ``m = 0`` are multiplied by 0 (a uniform
  distribution, log V, wherever a label survives), labels are ``ids · m`` with every 0 dropped (so token id 0 is
  never a target), mean over the surviving labels; the retain CE is this CE on x_s;
- the lens takes all L+1 ``output_hidden_states`` through lm_head(norm(.)) (the last one, already normed by
  transformers, is normed again, as in the reference), plus the final-logits CE, divided by L+1;
- each layer's MMD compares B samples of T·d numbers (the MLP output times the mask, flattened per sequence)
  with B samples of N(0, I) times the same mask (drawn from the seeded generator below, shape (B, T, d)).

``variant="response-tokens"`` is the cleaner loss this file shipped first (the v1 leaderboard's RepNoise rows);
its choices follow.

Choices the protocol leaves open, made here for ``response-tokens``:
- MMD positions: the MLP output of every decoder layer at the *response tokens* of x_h (positions whose
  label is not -100), one d-dimensional sample per token, against as many N(0, I_d) samples.
- Gaussian samples come from a CPU generator seeded with ``noise_seed * 1_000_000 + step`` and drawn
  in a fixed order (micro-batch, then layer), so a step's loss is reproducible on any device.
- The logit lens: the L+1 hidden states are the embedding output and the L layer outputs. In
  transformers 5.23 ``output_hidden_states`` already applies the final norm to the last one (and
  lm_head of it *is* the final logits), so the lens of the last layer is the final-logits term and only
  ``hidden_states[:-1]`` go through lm_head(norm(.)): L+1 terms, each normed exactly once, and H is
  their mean + 1. (The reference sums L+2 terms, normalising the last hidden state twice.)

Memory: kept for backward as autograd would keep them, the L lens logits (tokens × vocabulary each) and
the L MMD kernels (4 · tokens² each, five of them) of a cpu-preset batch (8 harmful rows of up to 256
tokens) exceed 18 GB for SmolLM2, and the alignment was killed on a 24 GB machine. So ``lens_ce``
computes each lens term's gradient with respect to its input in the forward pass, a chunk of tokens at a
time, and keeps only that (tokens × d) gradient (same arithmetic, same flops); and each layer's MMD is
checkpointed: only its two (tokens × d) inputs are kept and the kernel is recomputed in backward (same
arithmetic, one more MMD forward per layer).

Fixes vs the reference: labels stay integer (never multiplied by a float mask); the two streams are
paired by prompt (same seed, same length, see harmbench_ft.training.batches.BatchStream); the MLP
hooks are removed every step, also when the forward fails.

Gradient accumulation (``response-tokens``): CE_retain is exact (token sum over all micro-batches / their token count, as
loss_gradient). The MMD and log(H) terms are nonlinear in the batch, so they are computed per
micro-batch and averaged: an approximation of the big-batch loss, exact only with one micro-batch. ``original``
averages all its terms per micro-batch (its CEs are means over one batch's mask, as in the reference).

The original learning rate is 1e-4 (protocol.md): it is the alignment stage's lr, set it with
``--set alignment.train.lr=1e-4``.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harmbench_ft import Defense, Stage, StepContext, StepResult, UsageError, hookimpl, layers, lm_loss_sum, response_tokens

BANDWIDTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # × the mean pairwise squared distance (protocol.md section 3)
VARIANTS = ("original", "response-tokens")


@dataclass
class Params:
    # α, weight of −log(H), the harmful-loss ascent: protocol.md section 3, original paper default
    # (Rosati et al. 2024); the Booster/Panacea LoRA re-runs used 0.1 or 0.02.
    alpha: float = 1.0
    # β, weight of the MMD-to-noise term: protocol.md section 3, original paper default (re-runs: 0.001 or 0.1).
    beta: float = 0.001
    # Seed of the Gaussian samples (mixed with the step index): ours, so that the loss is reproducible.
    noise_seed: int = 0
    # Which loss: "original" = the authors' loss.py (protocol.md section 3, issue 16); "response-tokens" = the
    # response-label loss of the v1 leaderboard (this module's docstring).
    variant: str = "original"

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise UsageError(f"repnoise: variant={self.variant!r} is not one of {', '.join(VARIANTS)} (default original: the authors' loss)")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"repnoise: {name}={value} is out of range; it must be a finite number >= 0 (default {getattr(Params(), name)})")
        if self.noise_seed < 0:
            raise UsageError(f"repnoise: noise_seed={self.noise_seed} is out of range; it must be an integer >= 0 (default 0)")


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD² between samples x (n, d) and y (m, d): a sum of 5 RBF kernels exp(−‖a−b‖²/b_i) with
    b_i = {¼,½,1,2,4} × the mean pairwise squared distance of the pooled samples (detached, as the reference)."""
    z = torch.cat([x.float(), y.float()])
    sq = (z * z).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)  # expanded: no (n, n, d) tensor
    n = z.shape[0]
    bandwidth = (dist.detach().sum() / (n * n - n)).clamp_min(1e-12)
    kernel = sum(torch.exp(-dist / (bandwidth * s)) for s in BANDWIDTH_SCALES)
    k = x.shape[0]
    return kernel[:k, :k].mean() + kernel[k:, k:].mean() - 2 * kernel[:k, k:].mean()


@contextlib.contextmanager
def captured_outputs(modules: list[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record each module's forward output, in module order; the hooks are gone when the block exits."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out)) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def mean_response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens, on logits already gathered at those positions."""
    return F.cross_entropy(logits.float(), labels)


LENS_CHUNK = 256  # tokens per logits chunk in lens_ce: 256 × 49k vocabulary × 4 bytes = 50 MB at a time
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


class _LensCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``z @ weight.T`` against ``targets``, its gradient w.r.t. z computed in the
    forward pass chunk by chunk (softmax − one-hot, times the weight), so no logits are kept."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=z.device)
        grad = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        for start in range(0, n, LENS_CHUNK):
            rows = slice(start, start + LENS_CHUNK)
            logp = (z[rows] @ weight.T).float().log_softmax(dim=-1)  # one pass gives the loss and the softmax
            picked = torch.arange(logp.shape[0], device=z.device), targets[rows]
            loss -= logp[picked].sum()
            dlogits = logp.exp_()
            # Subnormal probabilities (< 1.2e-38; a quarter of a chunk in the lens of early layers, whose
            # logits span hundreds of nats) make the CPU's matmul below ~40x slower. Zeroing them changes
            # no product a float32 sum can hold.
            dlogits.masked_fill_(dlogits < SMALLEST_NORMAL, 0.0)
            dlogits[picked] -= 1
            grad[rows] = dlogits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad / n)
        ctx.z_dtype = z.dtype
        return loss / n

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (upstream * grad).to(ctx.z_dtype), None, None


def lens_ce(head: torch.nn.Module, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_response_ce(head(z), targets) without keeping the logits for backward, when the head is a plain,
    frozen, bias-free linear layer (LoRA does not target it); otherwise the plain computation."""
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _LensCrossEntropy.apply(z, head.weight, targets)
    return mean_response_ce(head(z), targets)


def harmful_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of a harmful micro-batch: (mean_l MMD to noise, H, CE of the final logits)."""
    mlps = layers.mlp_modules(model)
    with captured_outputs(mlps) as mlp_outputs:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    if len(mlp_outputs) != len(mlps) or len(out.hidden_states) != len(mlps) + 1:
        raise RuntimeError(f"repnoise: expected {len(mlps)} MLP outputs and {len(mlps) + 1} hidden states, got {len(mlp_outputs)} and {len(out.hidden_states)}")

    # MMD between each layer's MLP output at the response tokens and as many N(0, I) samples.
    tokens = batch["labels"] != -100
    noise = torch.stack([
        checkpoint(mmd, h[tokens], torch.randn(int(tokens.sum()), h.shape[-1], generator=generator).to(h.device), use_reentrant=False) for h in mlp_outputs
    ]).mean()

    # Logit lens at the positions that predict a response token (the shift of causal LM).
    predicts = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][predicts]
    final_ce = mean_response_ce(out.logits[:, :-1][predicts], targets)
    norm, head = layers.final_norm(model), layers.lm_head(model)
    lens = [lens_ce(head, norm(h[:, :-1][predicts]), targets) for h in out.hidden_states[:-1]]  # the last one is already normed: it is final_ce
    h_value = (final_ce + sum(lens)) / (len(lens) + 1) + 1
    return noise, h_value, final_ce


# -------------------------------------------------------------------------------------------------
# variant="original": the authors' loss.py
# -------------------------------------------------------------------------------------------------


def padded_to(batch: dict[str, torch.Tensor], width: int, pad_id: int | None) -> dict[str, torch.Tensor]:
    """A right-padded micro-batch widened to `width` (padding: pad_id, attention 0, label -100)."""
    extra = width - batch["input_ids"].shape[1]
    if extra == 0:
        return batch
    if pad_id is None:
        raise RuntimeError("repnoise: the paired micro-batches differ in width and the stream has no pad_id to widen them with")
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    return {k: F.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}


def masked_ce(ce_sum, n_vocab: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's masked_token_ce_loss, from the sum of CE over the positions whose logits survive.

    Shifted: position t's logits predict ids[t+1]; its logits are multiplied by mask[t] and its label is
    ids[t+1] · mask[t+1], dropped where that is 0. A surviving label facing zeroed logits costs log V and has
    no gradient, so only ``ce_sum(positions, targets)`` (a (B, T-1) bool selection) needs the model.
    """
    labels = ids[:, 1:] * mask[:, 1:]
    valid = labels != 0
    live = valid & mask[:, :-1]
    blank = int((valid & ~mask[:, :-1]).sum())
    return (ce_sum(live, labels[live]) + blank * math.log(n_vocab)) / int(valid.sum())


def original_retain(model: torch.nn.Module, x_s: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The retain term of loss.py: the masked CE of x_s under the pair's mask."""
    logits = model(input_ids=x_s["input_ids"], attention_mask=x_s["attention_mask"]).logits
    ce_sum = lambda live, t: F.cross_entropy(logits[:, :-1][live].float(), t, reduction="sum")  # noqa: E731
    return masked_ce(ce_sum, logits.shape[-1], x_s["input_ids"], mask)


def original_harmful_terms(model: torch.nn.Module, x_h: dict[str, torch.Tensor], mask: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The harmful terms of loss.py on one micro-batch: (mean_l MMD to noise, H, final-logits CE)."""
    mlps = layers.mlp_modules(model)
    with captured_outputs(mlps) as mlp_outputs:
        out = model(input_ids=x_h["input_ids"], attention_mask=x_h["attention_mask"], output_hidden_states=True)
    if len(mlp_outputs) != len(mlps) or len(out.hidden_states) != len(mlps) + 1:
        raise RuntimeError(f"repnoise: expected {len(mlps)} MLP outputs and {len(mlps) + 1} hidden states, got {len(mlp_outputs)} and {len(out.hidden_states)}")

    # One sample of T·d numbers per sequence: the masked MLP output against masked N(0, I) noise.
    rows, m = mask.shape[0], mask.unsqueeze(-1)
    noise = torch.stack([
        mmd((h * m).reshape(rows, -1), (torch.randn(h.shape, generator=generator).to(h.device, h.dtype) * m).reshape(rows, -1)) for h in mlp_outputs
    ]).mean()

    ids, n_vocab = x_h["input_ids"], out.logits.shape[-1]
    final_ce = masked_ce(lambda live, t: F.cross_entropy(out.logits[:, :-1][live].float(), t, reduction="sum"), n_vocab, ids, mask)
    norm, head = layers.final_norm(model), layers.lm_head(model)

    def lens_sum(h: torch.Tensor):
        return lambda live, t: lens_ce(head, norm(h[:, :-1][live]), t) * t.numel() if t.numel() else h.sum() * 0

    lens = [masked_ce(lens_sum(h), n_vocab, ids, mask) for h in out.hidden_states]  # all L+1; the last is normed twice
    h_value = (final_ce + sum(lens)) / len(out.hidden_states) + 1
    return noise, h_value, final_ce


class RepNoise(Defense):
    name = "repnoise"
    description = "Representation noising (Rosati et al. 2024): retain refusals, map harmful MLP activations to N(0,I) (MMD), ascend the logit-lens harmful loss; 2 passes plus a 31-layer logit lens (7.1x SFT per alignment step at the cpu preset on SmolLM2, docs/defenses.md)."
    stages = (Stage.ALIGNMENT,)
    needs = ("harmful", "harmful_refusals")
    Params = Params
    params_added_later = {"variant": "response-tokens"}  # the v1 leaderboard's runs, recorded before `variant` existed

    def schedule(self, stage: Stage, n_steps: int) -> list[str]:
        """Alignment steps draw the safe answers of the harmful prompts; step() draws their harmful twins."""
        if stage is Stage.ALIGNMENT:
            return ["harmful_refusals"] * n_steps
        return super().schedule(stage, n_steps)

    def step(self, ctx: StepContext, batches: list) -> StepResult:
        alpha, beta = self.params.alpha, self.params.beta
        harmless = batches  # x_s, from the "harmful_refusals" stream
        harmful = ctx.batches("harmful")  # x_h: same seed and length as x_s, so row i has the same prompt
        if [b["input_ids"].shape[0] for b in harmful] != [b["input_ids"].shape[0] for b in harmless]:
            raise RuntimeError("repnoise: harmful and harmful_refusals micro-batches differ in size, so they are not paired by prompt")
        generator = torch.Generator(device="cpu").manual_seed(self.params.noise_seed * 1_000_000 + ctx.step)
        if self.params.variant == "original":
            return self.original_step(ctx, harmless, harmful, generator)
        total_s = max(sum(response_tokens(b) for b in harmless), 1)
        k = len(harmful)

        for p in ctx.params:
            p.grad = None
        retain_sum = noise_sum = log_h_sum = harmful_ce_sum = 0.0
        try:
            for x_s, x_h in zip(harmless, harmful):
                # Two backward passes per micro-batch, so only one forward graph is alive at a time.
                retain = lm_loss_sum(ctx.model, x_s) / total_s
                retain.backward()
                noise, h_value, harmful_ce = harmful_terms(ctx.model, x_h, generator)
                log_h = torch.log(h_value)
                ((beta * noise - alpha * log_h) / k).backward()
                retain_sum += float(retain.detach())
                noise_sum += float(noise.detach()) / k
                log_h_sum += float(log_h.detach()) / k
                harmful_ce_sum += float(harmful_ce.detach()) / k
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ctx.params]
        finally:
            for p in ctx.params:
                p.grad = None
        loss = retain_sum + beta * noise_sum - alpha * log_h_sum
        return StepResult(loss, grads, {"retain_loss": retain_sum, "mmd": noise_sum, "log_h": log_h_sum, "harmful_loss": harmful_ce_sum})

    def original_step(self, ctx: StepContext, harmless: list, harmful: list, generator: torch.Generator) -> StepResult:
        """The authors' loss per paired micro-batch, averaged over the step's micro-batches."""
        alpha, beta, k = self.params.alpha, self.params.beta, len(harmful)
        pad_id = getattr(ctx.streams["harmful"], "pad_id", None)
        for p in ctx.params:
            p.grad = None
        sums = dict.fromkeys(("retain_loss", "mmd", "log_h", "harmful_loss"), 0.0)
        try:
            for x_s, x_h in zip(harmless, harmful):
                width = max(x_s["input_ids"].shape[1], x_h["input_ids"].shape[1])
                x_s, x_h = padded_to(x_s, width, pad_id), padded_to(x_h, width, pad_id)
                mask = x_h["input_ids"] != x_s["input_ids"]
                # Two backward passes per micro-batch, so only one forward graph is alive at a time.
                retain = original_retain(ctx.model, x_s, mask)
                (retain / k).backward()
                noise, h_value, harmful_ce = original_harmful_terms(ctx.model, x_h, mask, generator)
                log_h = torch.log(h_value)
                ((beta * noise - alpha * log_h) / k).backward()
                for name, value in zip(sums, (retain, noise, log_h, harmful_ce)):
                    sums[name] += float(value.detach()) / k
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ctx.params]
        finally:
            for p in ctx.params:
                p.grad = None
        loss = sums["retain_loss"] + beta * sums["mmd"] - alpha * sums["log_h"]
        return StepResult(loss, grads, sums)


@hookimpl
def hft_register_defenses(register):
    register(RepNoise)
