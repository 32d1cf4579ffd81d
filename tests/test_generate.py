"""Generation with a KV cache across loops: exactness against recomputation, exit rules."""
from __future__ import annotations

import pytest
import torch

from stars_scale.config import ModelConfig
from stars_scale.generate import GenerateOptions, generate, generate_many
from stars_scale.generate.exit_rules import Contraction, StepView
from stars_scale.model.looped import LoopedLM

LAYOUTS = {
    # the main job's layout: learned positions, prelude/core/coda, add injection, embed start
    "arith": dict(positions="learned", norm="layernorm", n_prelude=1, n_core=1, n_coda=1,
                  injection="add", init_state="embed"),
    # Huginn-like: RoPE, GQA, swiglu/rmsnorm, concat-linear adapter, zero start, 2 core blocks
    "huginn": dict(positions="rope", norm="rmsnorm", mlp="swiglu", kv_heads=2, n_prelude=1, n_core=2,
                   n_coda=1, injection="concat-linear", init_state="zero", pre_coda_norm=True),
    # Ouro-like: whole stack looped, peri norms, per-loop state norm
    "ouro": dict(positions="rope", norm="rmsnorm", mlp="swiglu", norm_placement="peri", n_core=2,
                 injection="none", init_state="embed", state_norm=True, final_norm=False),
}


def tiny_model(layout: str, seed: int = 0) -> LoopedLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=23, hidden=32, heads=4, mlp_hidden=64, max_seq_len=32,
                      init_std=0.2, **LAYOUTS[layout])
    return LoopedLM(cfg).eval()


def prompts(B=3, P=5, seed=1):
    return torch.randint(0, 23, (B, P), generator=torch.Generator().manual_seed(seed))


def reference_greedy(model, ids, n_new, depth):
    """The literal definition: recompute the whole sequence with forward() at depth r per token."""
    seq = ids
    for _ in range(n_new):
        logits = model(seq, n_free=depth, n_grad=0).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("cache", ["full", "shared", "none"])
def test_fixed_depth_generation_equals_forward_token_by_token(layout, cache):
    model = tiny_model(layout)
    ids = prompts()
    depth = 5
    # shared with k >= depth never reuses a slot: exact
    res = generate(model, ids, max_new_tokens=8, depth=depth, cache=cache, cache_slots=depth)
    ref = reference_greedy(model, ids, 8, depth)
    assert torch.equal(res.tokens, ref)
    assert res.loops.eq(depth).all()
    assert len(set(res.tokens[:, 5:].flatten().tolist())) > 1  # not a degenerate constant output


def cached_minus_uncached(model, B=2, P=12, prefill=4, depth=4) -> float:
    """Largest |logit difference| between prefill + one-token cached steps and forward()."""
    from stars_scale.generate.cache import LoopKVCache
    from stars_scale.generate.exit_rules import Fixed
    from stars_scale.generate.generator import run_loop

    seq = prompts(B=B, P=P)
    with torch.no_grad():
        want = model(seq, n_free=depth, n_grad=0).logits
        cache = LoopKVCache(model, B, P, max_depth=depth)
        got = []
        logits, _, loops = run_loop(model, seq[:, :prefill], 0, cache, Fixed(depth), depth)
        cache.commit(prefill, loops)
        got.append(logits)
        for t in range(prefill, P):
            logits, _, loops = run_loop(model, seq[:, t:t + 1], cache.pos, cache, Fixed(depth), depth)
            cache.commit(1, loops)
            got.append(logits)
    return (torch.stack(got, 1) - want[:, prefill - 1:]).abs().max().item()


def exactness_tolerance(model, depth=4) -> float:
    """How far two correct evaluation orders of the same logits may drift apart in float64.

    The cached path (attention over cached keys, one query at a time) and forward() (one causal
    attention over the whole sequence) reduce the same terms in different orders, so each layer's
    output differs by rounding: at most ~n·eps relative for a reduction of length n (Higham's γ_n).
    Over the L = prelude + depth·core + coda blocks on the path to a logit, with reductions at most
    n = max(hidden, mlp_hidden) long, that is L·n·eps·max|logit| before the blocks amplify it; we
    allow the blocks a gain of 100. Measured on these models: the difference is 5-110·eps·max|logit|
    in float32 and in float64 alike (huginn: 2.4e-5 and 7.0e-14), 600× inside the bound; a machine
    that rounds differently moves it by a small factor, not by 600. In float32 the bound would be
    ~2e-2, where a cache bug could hide, so the check runs in float64 (eps 2.2e-16): ~4e-11 here,
    while the cache bugs below move logits by 0.1 to 4.
    """
    cfg = model.cfg
    L = cfg.n_prelude + depth * cfg.n_core + cfg.n_coda
    n = max(cfg.hidden, cfg.mlp_hidden)
    scale = max(1.0, model(prompts(B=2, P=12), n_free=depth, n_grad=0).logits.abs().max().item())
    return 100 * L * n * torch.finfo(torch.float64).eps * scale


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_cached_logits_match_uncached(layout):
    """Prefill + one-token steps through the cache give forward()'s logits at every position
    (float64, so that only a cache bug, not rounding order, can exceed the tolerance)."""
    model = tiny_model(layout).double()
    with torch.no_grad():
        tol = exactness_tolerance(model)
    assert cached_minus_uncached(model) <= tol


@pytest.mark.parametrize("bug", ["slot_off_by_one", "missing_rope_offset"])
@pytest.mark.parametrize("layout", ["arith", "huginn"])
def test_cached_logits_check_catches_a_wrong_cache(layout, bug, monkeypatch):
    """The exactness check above is not vacuous: two deliberately wrong caches exceed its
    tolerance by orders of magnitude (iteration i using slot i - 1, so the first two iterations
    share one and a new token's iteration 0 reads earlier tokens' iteration-1 keys; new tokens
    rotated as if they stood at position 0). arith has learned positions, so its RoPE bug is
    the embedding offset instead."""
    from stars_scale.generate.cache import LayerKV, LoopKVCache

    model = tiny_model(layout).double()
    if bug == "slot_off_by_one":
        monkeypatch.setattr(LoopKVCache, "slot", lambda self, i: max(i - 1, 0))
    elif layout == "huginn":
        monkeypatch.setattr(LayerKV, "offset", property(lambda self: 0))
    else:
        embed = model.embed_tokens
        monkeypatch.setattr(model, "embed_tokens", lambda ids, offset=0: embed(ids, 0))
    with torch.no_grad():
        tol = exactness_tolerance(model)
    assert cached_minus_uncached(model) > 1e4 * tol


def test_shared_cache_slots_hold_the_latest_iteration_of_their_residue():
    """k = 2 < depth 5: iteration i reads/writes slot i mod 2, so after a token the slots hold
    its iterations 4 (slot 1: i = 3, 0-based) and 5 (slot 0: i = 4), as the full cache's slots 3, 4."""
    from stars_scale.generate.cache import LoopKVCache
    from stars_scale.generate.exit_rules import Fixed
    from stars_scale.generate.generator import run_loop

    model = tiny_model("huginn")
    ids = prompts(B=2, P=6)
    caches = {k: LoopKVCache(model, 2, 6, scheme=k, max_depth=5, slots=2) for k in ("full", "shared")}
    with torch.no_grad():
        for c in caches.values():
            run_loop(model, ids, 0, c, Fixed(5), 5)
            c.commit(6, torch.full((2,), 5))
    full, shared = caches["full"], caches["shared"]
    assert len(shared.core) == 2 and len(full.core) == 5
    for slot, it in ((0, 4), (1, 3)):
        for a, b in zip(shared.core[slot], full.core[it]):
            torch.testing.assert_close(a.k[:, :, :6], b.k[:, :, :6])
            torch.testing.assert_close(a.v[:, :, :6], b.v[:, :, :6])
    res = generate(model, ids, max_new_tokens=4, depth=5, cache="shared", cache_slots=2)
    assert res.loops.eq(5).all() and res.tokens.shape == (2, 10)


def test_adaptive_exit_fills_skipped_slots_with_the_last_iteration():
    """Row 0 stops after 1 iteration, row 1 after 3: row 0's slots 1, 2 hold its iteration-1 entry."""
    from stars_scale.generate.cache import LoopKVCache
    from stars_scale.generate.exit_rules import ExitRule
    from stars_scale.generate.generator import run_loop

    class PerRow(ExitRule):
        def converged(self, v):
            return torch.tensor([v.t >= 1, v.t >= 3])

    model = tiny_model("arith")
    ids = prompts(B=2, P=4)
    cache = LoopKVCache(model, 2, 4, max_depth=3)
    with torch.no_grad():
        _, _, loops = run_loop(model, ids, 0, cache, PerRow(), 3)
        cache.commit(4, loops)
    assert loops.tolist() == [1, 3]
    for s in (1, 2):
        assert torch.equal(cache.core[s][0].k[0], cache.core[0][0].k[0])  # filled from iteration 1
    assert not torch.equal(cache.core[2][0].k[1], cache.core[0][0].k[1])  # row 1 wrote its own


def test_eos_stops_rows_and_loops_are_zero_after():
    model = tiny_model("arith")
    ids = prompts(B=4)
    res = generate(model, ids, max_new_tokens=10, depth=3)
    gen = res.tokens[0, 5:].tolist()
    j = next(j for j in range(1, 10) if gen[j] not in gen[:j])  # first new token not seen before
    eos = gen[j]  # make it the EOS: row 0 stops there
    res = generate(model, ids, max_new_tokens=10, depth=3, eos_id=eos)
    assert res.finished[0]
    assert res.new_tokens(0) == gen[:j]
    assert res.loops[0, j + 1:].eq(0).all() and res.loops[0, :j + 1].eq(3).all()
    assert (res.tokens[0, 5 + j:] == eos).all()


@pytest.mark.parametrize("rule,tol", [("delta", 1e-2), ("kl", 1e-4), ("contraction", 1e-2)])
def test_exit_rules_stop_early_on_a_contractive_core(rule, tol):
    """A core map scaled to contract: every rule stops well before max_depth, the fixed depth
    at the reported loop count gives the same tokens, and more tolerance means fewer loops."""
    model = tiny_model("huginn")
    with torch.no_grad():  # make f contractive: shrink the adapter's state half
        model.adapter.weight[:, :32] *= 0.1
    ids = prompts()
    res = generate(model, ids, max_new_tokens=6, exit=rule, tol=tol, max_depth=40)
    assert res.loops.max() < 40 and res.loops.min() >= 1
    loose = generate(model, ids, max_new_tokens=6, exit=rule, tol=tol * 100, max_depth=40)
    assert loose.loops.float().mean() <= res.loops.float().mean()
    deep = generate(model, ids, max_new_tokens=6, depth=40)
    assert torch.equal(res.tokens, deep.tokens)  # converged: the answer of a deep loop


@pytest.mark.parametrize("cache", ["full", "none"])
def test_confidence_exit_stops_where_the_top1_mass_first_reaches_one_minus_tol(cache):
    """By hand, from forward() at every depth: the first token of each row stops at the first depth
    whose next-token distribution leaves less than tol outside its argmax (else at max_depth)."""
    model = tiny_model("arith")
    ids = prompts(B=8)
    D = 12
    with torch.no_grad():
        miss = torch.stack([1 - model(ids, n_free=d, n_grad=0).logits[:, -1].float().softmax(-1).amax(-1)
                            for d in range(1, D + 1)])  # [D, B]: mass outside the top token
    # tol halfway across the widest gap between neighbouring values in the middle half: no value lies
    # within gap/2 of it, far more than the float32 difference between the cached and recomputed paths
    v = miss.flatten().sort().values.double()
    lo, hi = len(v) // 4, 3 * len(v) // 4
    k = lo + int((v[lo + 1:hi + 1] - v[lo:hi]).argmax())
    tol = float(v[k] + v[k + 1]) / 2
    assert v[k + 1] - v[k] > 1e-4
    below = miss < tol
    want = torch.where(below.any(0), below.int().argmax(0) + 1, torch.full_like(below[0], D, dtype=torch.long))
    assert len(set(want.tolist())) > 1  # the rows stop at different depths: the test can tell them apart
    res = generate(model, ids, max_new_tokens=1, exit="confidence", tol=tol, max_depth=D, cache=cache)
    assert res.loops[:, 0].tolist() == want.tolist()
    assert res.probe_evals == int(want.max())  # one coda pass per iteration of the batch


def test_confidence_tolerance_must_leave_mass_outside_the_top_token():
    from stars_scale.errors import UserError
    from stars_scale.eval.exit_accuracy import parse_tols
    from stars_scale.generate import make_rule

    assert make_rule("confidence", tol=0.05).tol == 0.05
    for bad in (0.0, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="confidence needs a tolerance"):
            make_rule("confidence", tol=bad)
    with pytest.raises(ValueError, match="confidence needs a tolerance"):
        GenerateOptions(max_new_tokens=1, exit="confidence", tol=1.0).validate()
    with pytest.raises(UserError, match="--tol: 'confidence=1'"):
        parse_tols("confidence=1", ["confidence", "kl"])
    assert parse_tols("0.01", ["confidence", "kl"]) == [("confidence", 0.01), ("kl", 0.01)]


def test_adaptive_exit_cached_equals_uncached_when_every_token_exits_at_the_same_depth():
    model = tiny_model("arith")
    ids = prompts(B=1)
    a = generate(model, ids, max_new_tokens=6, exit="delta", tol=1e9, max_depth=8)  # stops at t=1
    b = generate(model, ids, max_new_tokens=6, exit="delta", tol=1e9, max_depth=8, cache="none")
    assert a.loops.eq(1).all() and torch.equal(a.tokens, b.tokens)


def test_contraction_bound_uses_the_observed_ratio_and_rho():
    """An affine contraction f(h) = A h + b (ρ(A) = 0.5): L̂ and ρ̂ find 0.5, and the rule stops
    exactly when L/(1−L)·‖h_t − h_{t−1}‖ < tol·‖h_t‖, where the true error is below the bound."""
    A = torch.diag(torch.tensor([0.5, 0.25]))
    b = torch.tensor([1.0, 1.0])
    f = lambda x: x @ A.T + b  # noqa: E731
    h_star = torch.linalg.solve(torch.eye(2) - A, b)
    rule = Contraction(tol=1e-3, rho_iters=2)
    rule.reset(1)
    h = torch.tensor([[9.0, -7.0]])
    for t in range(1, 60):
        hn = f(h)
        out = rule.converged(StepView(t=t, h=hn, h_prev=h, decode=None, core_map=f, s=hn[:, None]))
        d, hnorm = (hn - h).norm(), hn.norm()
        if t >= 2:
            L = float(rule.last_L)
            assert bool(out) == bool(L / (1 - L) * d < 1e-3 * hnorm)
        if t >= 4:  # the power iteration, reusing its direction, has found ρ(A)
            assert abs(float(rule.last_L) - 0.5) < 0.01
        h = hn
        if out.all():
            break
    assert out.all() and 2 < t < 59 and rule.probe_evals == 2 * (t - 1)
    assert (h - h_star).norm() <= 1e-3 * h.norm()  # the bound held


def test_warm_start_runs_and_differs_from_cold_start_only_in_the_start_state():
    model = tiny_model("arith")
    ids = prompts()
    cold = generate(model, ids, max_new_tokens=5, exit="delta", tol=1e-3, max_depth=12)
    warm = generate(model, ids, max_new_tokens=5, exit="delta", tol=1e-3, max_depth=12, warm_start=True)
    assert warm.tokens.shape == cold.tokens.shape
    assert torch.equal(warm.loops[:, 0], cold.loops[:, 0])  # the prefill is the same
    with pytest.raises(ValueError, match="warm_start needs a KV cache"):
        generate(model, ids, max_new_tokens=2, depth=2, cache="none", warm_start=True)


def test_generate_many_batches_by_length_and_matches_single_prompts():
    model = tiny_model("huginn")
    ps = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11], [3, 3]]
    opts = GenerateOptions(max_new_tokens=4, depth=3)
    many = generate_many(model, ps, opts, batch_size=2)
    for p, (toks, loops) in zip(ps, many):
        one = generate(model, torch.tensor([p]), opts)
        assert toks == one.new_tokens(0) and loops == [3] * len(toks)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model("arith")
    ids = prompts()
    greedy = generate(model, ids, max_new_tokens=5, depth=2)
    k1 = generate(model, ids, max_new_tokens=5, depth=2, temperature=1.0, top_k=1)
    assert torch.equal(greedy.tokens, k1.tokens)
    a = generate(model, ids, max_new_tokens=5, depth=2, temperature=1.5, seed=3)
    b = generate(model, ids, max_new_tokens=5, depth=2, temperature=1.5, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    p = generate(model, ids, max_new_tokens=5, depth=2, temperature=1.0, top_p=1e-6)
    assert torch.equal(greedy.tokens, p.tokens)  # the smallest nucleus is the argmax


def test_bad_options_are_named():
    model = tiny_model("arith")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompts(P=30), max_new_tokens=10, depth=2)
    with pytest.raises(ValueError, match="tolerance"):
        generate(model, prompts(), max_new_tokens=2, exit="delta", tol=None)
    with pytest.raises(ValueError, match="unknown exit rule"):
        generate(model, prompts(), max_new_tokens=2, exit="bogus", tol=1.0)


@pytest.mark.parametrize("cache", ["full", "none"])
def test_forced_scoring_equals_forward_log_probs(cache):
    model = tiny_model("huginn")
    seq = prompts(B=2, P=9)
    res = generate(model, seq[:, :4], depth=3, forced=seq[:, 4:], cache=cache)
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1], n_free=3, n_grad=0).logits.float(), -1)
    want = logp[:, 3:].gather(2, seq[:, 4:, None])[..., 0]
    torch.testing.assert_close(res.logprobs, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(res.greedy, logp[:, 3:].argmax(-1) == seq[:, 4:])
    assert torch.equal(res.tokens, seq)
