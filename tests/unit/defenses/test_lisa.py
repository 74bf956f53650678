"""Lisa: the bi-state schedule, the proximal anchors, the warm-up, and the real loop over the schedule."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from harmbench_ft import Stage, UsageError
from harmbench_ft.spec import TrainConfig
from harmbench_ft.training.batches import BatchStream, steps_for
from harmbench_ft.training.loop import train
from hft_bench_plugins.defenses.lisa import Lisa, Params
from tests.conftest import ROWS, make_batches, make_ctx


def runs(schedule):
    """Run-length encoding: [("alignment", 2), ("user", 3), ...]."""
    return [(source, len(list(group))) for source, group in itertools.groupby(schedule)]


@pytest.mark.parametrize("n_steps", [1, 3, 4, 7, 9])
def test_schedule_counts_blocks_and_starts_in_alignment(n_steps):
    schedule = Lisa(Params(k_align=2, k_ft=3)).schedule(Stage.FINETUNE, n_steps)
    blocks = -(-n_steps // 3)
    assert schedule.count("user") == n_steps  # every user step of plain SFT is kept
    assert schedule.count("alignment") == 2 * blocks
    expected = [("alignment", 2), ("user", 3)] * (blocks - 1) + [("alignment", 2), ("user", n_steps - 3 * (blocks - 1))]
    assert runs(schedule) == expected
    assert schedule[0] == "alignment" and schedule[-1] == "user"


def test_schedule_with_paper_defaults_on_a_short_run_is_three_times_longer():
    schedule = Lisa().schedule(Stage.FINETUNE, 50)
    assert runs(schedule) == [("alignment", 100), ("user", 50)]


def plain_gradient(model, params, batch):
    """Mean cross-entropy over response tokens, differentiated by plain autograd (one micro-batch)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    return torch.autograd.grad(loss, params)


def move(params, scale=0.01, seed=0):
    """Stand in for an optimizer step; return the displacement."""
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(p.shape, generator=g) * scale for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    return deltas


def assert_grads(result, expected):
    assert len(result.grads) == len(expected)
    for got, want in zip(result.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_anchor_is_recorded_at_each_switch_and_the_proximal_gradient_is_rho_times_drift(tiny):
    model, tok = tiny
    align = make_batches(tok, ROWS[:4], micro=4)
    user = make_batches(tok, ROWS[4:], micro=4)
    rho = 0.5
    lisa = Lisa(Params(rho=rho, k_align=2, k_ft=2, warmup_fraction=0.0))
    ctx = lambda step, source: make_ctx(model, Stage.FINETUNE, {}, step=step, total_steps=8, source=source)  # noqa: E731
    params = ctx(0, "alignment").params

    # The first alignment block is anchored at the initial weights (git-disl/Lisa trainer.py `init`): step 0 has
    # no proximal term (the reference needs steps > 0.1·T), step 1 is pulled back by ρ (w − w0).
    initial = [p.detach().clone() for p in params]
    assert_grads(lisa.step(ctx(0, "alignment"), align), plain_gradient(model, params, align[0]))
    assert all(torch.equal(a, w) for a, w in zip(lisa.anchor, initial))
    drift = move(params, seed=1)
    plain = plain_gradient(model, params, align[0])
    assert_grads(lisa.step(ctx(1, "alignment"), align), [g + rho * d for g, d in zip(plain, drift)])

    # Switch to user: the anchor is where alignment ended, so the drift (and the proximal term) is zero.
    where_alignment_ended = [p.detach().clone() for p in params]
    assert_grads(lisa.step(ctx(2, "user"), user), plain_gradient(model, params, user[0]))
    assert all(torch.equal(a, w) for a, w in zip(lisa.anchor, where_alignment_ended))

    # Still user: gradient = plain + ρ (w − anchor), and w − anchor is exactly what we moved.
    drift = move(params, seed=2)
    plain = plain_gradient(model, params, user[0])
    result = lisa.step(ctx(3, "user"), user)
    assert_grads(result, [g + rho * d for g, d in zip(plain, drift)])
    assert result.metrics["proximal"] == pytest.approx(rho / 2 * sum(float((d**2).sum()) for d in drift), rel=1e-4)

    # Switch back to alignment: the anchor moves to where the user state ended.
    move(params, seed=3)
    where_user_ended = [p.detach().clone() for p in params]
    assert_grads(lisa.step(ctx(4, "alignment"), align), plain_gradient(model, params, align[0]))
    assert all(torch.equal(a, w) for a, w in zip(lisa.anchor, where_user_ended))
    drift = move(params, seed=4)
    plain = plain_gradient(model, params, align[0])
    assert_grads(lisa.step(ctx(5, "alignment"), align), [g + rho * d for g, d in zip(plain, drift)])


def test_no_proximal_term_during_warm_up(tiny):
    model, tok = tiny
    align = make_batches(tok, ROWS[:4], micro=4)
    user = make_batches(tok, ROWS[4:], micro=4)
    rho = 2.0
    lisa = Lisa(Params(rho=rho, k_align=1, k_ft=5, warmup_fraction=0.3))  # 10 steps: steps 0 to 3 warm up
    ctx = lambda step, source: make_ctx(model, Stage.FINETUNE, {}, step=step, total_steps=10, source=source)  # noqa: E731
    params = ctx(0, "alignment").params

    lisa.step(ctx(0, "alignment"), align)
    lisa.step(ctx(1, "user"), user)  # the anchor is recorded here
    first = move(params, seed=1)
    warm = lisa.step(ctx(2, "user"), user)
    assert_grads(warm, plain_gradient(model, params, user[0]))  # an anchor exists and w moved, but step 2 < 0.3 * 10
    assert warm.metrics["proximal"] == 0.0
    second = move(params, seed=2)
    # Step 3 = 0.3 * 10 exactly: still warming up, as the reference adds the term only when steps > 0.1·T.
    assert_grads(lisa.step(ctx(3, "user"), user), plain_gradient(model, params, user[0]))

    third = move(params, seed=3)
    plain = plain_gradient(model, params, user[0])
    assert_grads(lisa.step(ctx(4, "user"), user), [g + rho * (a + b + c) for g, a, b, c in zip(plain, first, second, third)])


def test_real_loop_over_the_schedule_uses_every_user_row_once(tiny):
    model, tok = tiny
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-3, max_length=96, lora_r=4, lora_alpha=8)
    user = BatchStream(ROWS, tok, cfg, seed=0)
    alignment = BatchStream(ROWS[:3], tok, cfg, seed=0)
    n_steps = steps_for(len(ROWS), cfg)
    lisa = Lisa(Params(k_align=1, k_ft=3))
    schedule = lisa.schedule(Stage.FINETUNE, n_steps)
    assert schedule == ["alignment", "user", "user", "user", "alignment", "user"]

    seen = []

    def step(ctx, batches):
        seen.append(ctx.source)
        return lisa.step(ctx, batches)

    stats = train(model, step, schedule, {"user": user, "alignment": alignment}, cfg, Stage.FINETUNE)
    assert stats.steps == len(schedule) and seen == schedule
    assert user.rows_served == len(ROWS)  # one epoch: exactly n rows ...
    assert user.order == []  # ... and the epoch's permutation is used up: each row served once
    assert alignment.rows_served == 2 * cfg.batch_size
    # the loop records the mean of what the steps reported: the proximal term, zero during the warm-up (10% of 6
    # steps: step 0 only) and positive afterwards
    assert stats.metrics["proximal"] > 0.0


def test_bad_parameters_are_usage_errors_naming_the_parameter():
    with pytest.raises(UsageError, match="k_align=0"):
        Lisa.make_params({"k_align": "0"})
    with pytest.raises(UsageError, match="rho=-1"):
        Lisa.make_params({"rho": "-1"})
    with pytest.raises(UsageError, match="warmup_fraction=1.5"):
        Lisa.make_params({"warmup_fraction": "1.5"})


def test_registers_as_lisa():
    from hft_bench_plugins.defenses import lisa

    registered = []
    lisa.hft_register_defenses(registered.append)
    assert registered == [Lisa] and Lisa.name == "lisa" and Lisa.stages == (Stage.FINETUNE,) and Lisa.needs == ("alignment",)


def test_the_anchor_fix_leaves_every_committed_lisa_cell_unchanged():
    """Before the fix the first block had no anchor and the warm-up ended at step == f·T; after it, the first block
    is anchored at the initial weights and the warm-up includes step f·T. The two compute the same run when the
    whole first alignment block lies inside the warm-up and f·T is not a step index after it, which holds for
    every grid committed under leaderboards/grids, so their Lisa records stand (issue 16, item 4)."""
    from pathlib import Path

    from harmbench_ft.grid.gridfile import expand, load_grid

    checked = 0
    for path in sorted((Path(__file__).parents[3] / "leaderboards" / "grids").glob("*.toml")):
        for spec in expand(load_grid(path)):
            if spec.defense.name != "lisa":
                continue
            lisa = Lisa(Lisa.make_params(spec.defense.args))
            user_rows = spec.attack.n
            schedule = lisa.schedule(Stage.FINETUNE, steps_for(user_rows, spec.finetune))
            bound = lisa.params.warmup_fraction * len(schedule)
            assert lisa.params.k_align - 1 <= bound, (path.name, spec.run_id())
            assert not (bound == int(bound) and bound >= lisa.params.k_align), (path.name, spec.run_id())
            checked += 1
    assert checked >= 8
