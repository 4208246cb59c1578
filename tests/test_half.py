"""Float16 models and autocast: the edit math stays float32 whatever the activations' dtype
or an enclosing ``torch.autocast`` (the way SD v1.x is usually run on a GPU), checked
against a float64 oracle; and a float16 generation with edits keeps the causal test's
guarantees (strength 0 bitwise, the probe reads the target up to float16 rounding, the
random control as long as the probe edit)."""

from __future__ import annotations

import pytest
import torch

from actstore.generation.points import hooks
from actstore.generation.sampling import GenerationConfig, generate
from actstore.intervene.edits import (EditHook, direction_key, edit_sizes, equal_norm,
                                      generate_edited, probe_predict, project)

T, C, N = 64, 320, 2
F16_EPS = 2.0 ** -10      # float16's spacing at 1


def _tokens(dtype=torch.float32, scale=3.0):
    """SD-like activations (a few units, T tokens of C channels), a ridge probe, targets."""
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(N, T, C, generator=g) * scale).to(dtype)
    w, b = torch.randn(C, generator=g) * 0.05, torch.tensor(0.2)
    t = torch.randn(N, T, generator=g)
    return a, w, b, t


def _hook(w, b, t, random=(False, True)):
    keys = [direction_key("img", 0, 0)] * N
    hook = EditHook("projection", "continuous", {"L": "ridge"}, {"L": {0: (w, b)}}, {"L": t},
                    N, strengths=torch.ones(N), random=torch.tensor(random), keys=keys)
    hook.step = 0
    return hook


def _oracle(a, w, b, t):
    """The minimal-norm edit in float64, and the probe's reading of a float64 activation."""
    a, w, b, t = a.double(), w.double(), b.double(), t.double()
    return a + ((t - (a @ w + b)) / (w @ w))[..., None] * w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_edit_under_autocast_is_the_float32_edit(dtype):
    """Under autocast every matmul of the hook ran in bfloat16: the probe read the float32
    edit 0.03 off its target (float32: 2e-6) and the stats said 0.008; a float16 model
    under autocast raised inside the hook."""
    a, w, b, t = _tokens(dtype)
    out = torch.cat([torch.zeros_like(a), a])
    plain = _hook(w, b, t)
    expected = plain("L", out)
    hook = _hook(w, b, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = hook("L", out)
    assert got.dtype == dtype
    assert torch.equal(got, expected)           # the same bits as without autocast
    assert (hook.errors == plain.errors).all() and hook.sizes.keys() == plain.sizes.keys()
    oracle = _oracle(a, w, b, t)[0]             # row 0: the probe edit
    ulp = F16_EPS if dtype == torch.float16 else 2.0 ** -20
    assert float((got[N].double() - oracle).abs().max()) <= ulp * float(oracle.abs().max())
    read = got[N].double() @ w.double() + b.double()
    bound = 4e-6 if dtype == torch.float32 else \
        F16_EPS * float((a[0].double().abs() @ w.double().abs()).max())
    assert float((read - t[0].double()).abs().max()) <= bound


def test_probe_math_takes_float16_activations():
    """A float16 model's activations meet the float32 probes a store keeps: the probe's
    reading and the projection are float32, equal to float64 up to float32 rounding (before:
    'expected m1 and m2 to have the same dtype')."""
    a, w, b, t = _tokens(torch.float16)
    z = probe_predict(a, w, b)
    assert z.dtype == torch.float32
    exact = a.double() @ w.double() + b.double()
    assert float((z.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max())
    new = project(a, w, b, t)
    assert new.dtype == torch.float32
    oracle = _oracle(a, w, b, t)
    assert float((new.double() - oracle).abs().max()) < 1e-5 * float(oracle.abs().max())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(project(a.float(), w, b, t), project(a, w, b, t))


def test_edit_sizes_and_equal_norm_of_float16_tokens_do_not_overflow():
    """‖a‖ over all tokens of a float16 activation passes 65504 at SD's sizes (64 tokens ×
    1280 channels of magnitude 300): the overall edit size was Δ/inf = 0. Sizes and the
    random control's norms are float32 sums, equal to float64 ones."""
    a = torch.full((N, 64, 1280), 300.0, dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(N, 64, 1280, generator=g) * 30).to(torch.float16)
    sizes = edit_sizes(a, delta).double()
    ad, dd = a.double(), delta.double()
    oracle = torch.stack([dd.flatten(1).norm(dim=1) / ad.flatten(1).norm(dim=1),
                          (dd.norm(dim=-1) / ad.norm(dim=-1)).median(dim=1).values,
                          (dd.norm(dim=-1) / ad.norm(dim=-1)).max(dim=1).values], 1)
    torch.testing.assert_close(sizes, oracle, rtol=2e-4, atol=0)   # float32 sums of 82k terms
    u = torch.randn(N, 64, 1280, generator=g).to(torch.float16)
    same = equal_norm(delta, u).double()
    torch.testing.assert_close(same.norm(dim=-1), dd.norm(dim=-1), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def half_model():
    from actstore.generation.models import load_model

    return load_model("tiny-random", dtype="float16", device="cpu")


def test_float16_generation_keeps_the_edit_guarantees(half_model):
    """A real float16 run (tiny-random on the CPU, float16 kernels): strength 0 gives the
    plain generation bit for bit (editing one guidance half or both); strength 1 makes the probe read the target up to float16
    rounding of the edited activation; the random control's realized edit is as long as the
    probe's, token by token, at the first edited point (before the arms' inputs differ)."""
    layer = "mid_block.attentions.0"
    prompts, seeds = ["a red car", "a red car"], [7, 7]
    gen = GenerationConfig(steps=3, guidance=7.5)
    plain = generate(half_model, prompts, seeds, gen)
    seen = {}

    def keep(name, tokens):
        seen.setdefault(len(seen), tokens[N:].detach().clone())

    with hooks(half_model, [layer], keep):
        generate(half_model, prompts, seeds, gen)
    a0 = seen[0].float()                             # step 0's activation, both rows equal
    c = a0.shape[-1]
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(c, generator=g) / c ** 0.5, torch.tensor(0.1)
    t = probe_predict(a0, w, b) + 2.0                 # every token asked 2 units more
    for strengths, expect_plain, halves in (([0.0, 0.0], True, "cond"),
                                            ([0.0, 0.0], True, "both"),
                                            ([1.0, 1.0], False, "cond")):
        hook = EditHook("projection", "continuous", {layer: "ridge"}, {layer: {0: (w, b)}},
                        {layer: t}, N, strengths=torch.tensor(strengths),
                        random=torch.tensor([False, True]),
                        keys=[direction_key("img", 0, 0)] * N, halves=halves)
        images = generate_edited(half_model, prompts, seeds, gen, hook=hook)
        assert (images == plain).all() == expect_plain
    after, before = hook.errors[0, 1], hook.errors[0, 0]
    assert before > 1.9 and after < 0.01 * before, hook.errors
    bound = F16_EPS * float(((a0[0].abs() + 2.0 * w.abs().max() / (w @ w)) @ w.abs()).max())
    assert after <= bound
    size = hook.sizes[(layer, 0)]                     # (row, measure): realized sizes
    assert size[0, 0] > 0.01
    assert abs(size[1, 0] - size[0, 0]) <= 4 * F16_EPS * max(1.0, size[0, 0])
