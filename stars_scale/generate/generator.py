"""Batched generation from a looped LM with a per-token loop depth.

    res = generate(model, ids, max_new_tokens=8, depth=8)                         # fixed depth
    res = generate(model, ids, max_new_tokens=8, exit="contraction", tol=1e-3, max_depth=32)

Each new token runs prelude -> core × r -> coda on its own position only, reading the keys and
values of earlier positions from a `LoopKVCache` (cache="full" | "shared"; "none" recomputes the
whole sequence every token, the reference the cached paths are tested against). r is `depth`
or whatever the exit rule decides per row (see exit_rules.py), at most `max_depth`. The prompt
(prefill) is run as one block; its exit decision is taken on its last position (the one that
predicts the first new token) and all its positions get that depth.

`warm_start=True` (continuous depth, needs a cache): a new token's loop starts from the final
state of the previous token instead of `init_state` of its own embedding.

`generate` takes a [B, P] tensor (one prompt length); `generate_many` takes prompts of any
lengths and batches those of equal length together (exact: no padding enters attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from stars_scale.generate.cache import LoopKVCache
from stars_scale.generate.exit_rules import ExitRule, StepView, make_rule

CACHE_SCHEMES = ("full", "shared", "none")


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, P + n] prompt and generated tokens (EOS repeated after a row ends)
    prompt_len: int
    loops: torch.Tensor  # [B, n] core iterations spent on each generated token (0 after EOS)
    finished: torch.Tensor  # [B] bool: the row emitted EOS
    probe_evals: int = 0  # extra batched coda/core passes the exit rule made (kl, contraction ρ̂)
    eos_id: Optional[int] = None
    logprobs: Optional[torch.Tensor] = None  # [B, n] log p of each emitted token (always float32)
    greedy: Optional[torch.Tensor] = None  # [B, n] bool: the token was the argmax

    def new_tokens(self, row: int, keep_eos: bool = False) -> list[int]:
        out = self.tokens[row, self.prompt_len:].tolist()
        if self.eos_id is not None and self.eos_id in out:
            out = out[: out.index(self.eos_id) + (1 if keep_eos else 0)]
        return out

    def token_loops(self) -> list[int]:
        """Loops of every generated token of every row (EOS included, padding after it not)."""
        return [int(x) for x in self.loops[self.loops > 0].tolist()]


@dataclass
class GenerateOptions:
    max_new_tokens: int = 32
    depth: Optional[int] = None  # fixed depth; else `exit` with `tol`
    exit: str = "fixed"
    tol: Optional[float] = None
    max_depth: int = 64
    rho_iters: int = 0  # contraction: power-iteration steps for ρ̂ (0: the observed ratio only)
    cache: str = "full"
    cache_slots: int = 4  # shared cache: k
    warm_start: bool = False
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    eos_id: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.cache not in CACHE_SCHEMES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_SCHEMES)}, got {self.cache!r}")
        if self.warm_start and self.cache == "none":
            raise ValueError("warm_start needs a KV cache (cache full or shared)")
        if self.exit == "fixed" and (self.depth is None or self.depth < 1):
            raise ValueError(f"a fixed exit needs depth >= 1, got {self.depth}")
        if self.exit != "fixed" and self.max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.exit != "fixed" and self.rho_iters < 0:
            raise ValueError(f"rho_iters must be >= 0, got {self.rho_iters}")
        if self.cache == "shared" and self.cache_slots < 1:
            raise ValueError(f"cache_slots must be >= 1, got {self.cache_slots}")
        if not 0 <= self.temperature < math.inf:  # NaN fails too
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rule()  # the rule's own checks: a known name, a tolerance it accepts

    def rule(self) -> tuple[ExitRule, int]:
        if self.exit == "fixed":
            return make_rule("fixed", depth=self.depth), self.depth
        return make_rule(self.exit, tol=self.tol, rho_iters=self.rho_iters), self.max_depth


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def run_loop(model, ids: torch.Tensor, offset: int, cache: Optional[LoopKVCache], rule: ExitRule,
             max_depth: int, s0: Optional[torch.Tensor] = None,
             init_generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prelude, core loop under `rule`, coda for `ids` at positions offset.. ->
    (logits of the last position [B, V], final states [B, T, D], loops per row [B])."""
    B = ids.shape[0]
    e = model.encode(ids, None if cache is None else cache.prelude, offset)
    s = model.init_state(e, init_generator) if s0 is None else s0
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    loops = torch.full((B,), max_depth, dtype=torch.long, device=ids.device)
    rule.reset(B)

    def slot(i: int):
        return None if cache is None else cache.iteration(i)

    for i in range(max_depth):
        if cache is not None:
            cache.write_rows = ~done if bool(done.any()) else None
        s_new = model.core_step(s, e, slot(i))
        s_new = torch.where(done.view(-1, 1, 1), s, s_new)
        s_prev = s

        def decode(state: torch.Tensor) -> torch.Tensor:
            if cache is None:
                return model.decode(state)[:, -1]
            with cache.read_only():
                return model.decode(state, cache.coda)[:, -1]

        def core_map(h: torch.Tensor, i=i, s_prev=s_prev) -> torch.Tensor:
            x = s_prev.clone()
            x[:, -1] = h
            if cache is None:
                return model.core_step(x, e)[:, -1]
            with cache.read_only():
                return model.core_step(x, e, cache.iteration(i))[:, -1]

        view = StepView(t=i + 1, h=s_new[:, -1], h_prev=s_prev[:, -1], decode=decode, core_map=core_map, s=s_new)
        stop = rule.converged(view) & ~done
        loops = torch.where(stop, torch.full_like(loops, i + 1), loops)
        done |= stop
        s = s_new
        if bool(done.all()):
            break
    if cache is not None:
        cache.write_rows = None
    logits = model.decode(s, None if cache is None else cache.coda)[:, -1]
    return logits, s, loops


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, opts: Optional[GenerateOptions] = None,
             forced: Optional[torch.Tensor] = None, **kw) -> GenerationResult:
    """Generate up to `max_new_tokens` for every row of `input_ids` [B, P]; see the module doc.

    `forced` [B, n] (scoring): emit these tokens instead of sampling, under the same depth or
    exit rule; the result's `logprobs` and `greedy` then score them (EOS does not stop a row)."""
    opts = opts or GenerateOptions(**kw)
    if forced is not None:
        opts = GenerateOptions(**{**opts.__dict__, "max_new_tokens": forced.shape[1], "eos_id": None})
    opts.validate()
    rule, max_depth = opts.rule()
    B, P = input_ids.shape
    total = P + opts.max_new_tokens - 1  # the last token is sampled, never fed back
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {opts.max_new_tokens} - 1 = {total} exceeds "
                         f"model.max_seq_len={model.cfg.max_seq_len}")
    if P < 1:
        raise ValueError("a prompt needs at least one token")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = input_ids.to(device)
    sample_gen = torch.Generator().manual_seed(opts.seed)
    init_gen = torch.Generator(device=device).manual_seed(opts.seed + 1)
    cache = None
    if opts.cache != "none":
        cache = LoopKVCache(model, B, total, scheme=opts.cache, max_depth=max_depth, slots=opts.cache_slots)
    probe = 0
    try:
        logits, s, loops = run_loop(model, ids, 0, cache, rule, max_depth, init_generator=init_gen)
        probe += rule.probe_evals
        if cache is not None:
            cache.commit(P, loops)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        new, used, logps, greedy = [], [], [], []
        for n in range(opts.max_new_tokens):
            if forced is None:
                tok = sample(logits, opts.temperature, opts.top_k, opts.top_p, sample_gen)
            else:
                tok = forced[:, n].to(device)
            logps.append(torch.log_softmax(logits.float(), -1).gather(1, tok[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == tok)
            if opts.eos_id is not None:
                tok = torch.where(finished, torch.full_like(tok, opts.eos_id), tok)
            used.append(torch.where(finished, torch.zeros_like(loops), loops))
            new.append(tok)
            if opts.eos_id is not None:
                finished |= tok == opts.eos_id
            if n == opts.max_new_tokens - 1 or bool(finished.all()):
                break
            if cache is None:
                seq = torch.cat([ids, torch.stack(new, 1)], dim=1)
                logits, s, loops = run_loop(model, seq, 0, None, rule, max_depth, init_generator=init_gen)
            else:
                s0 = s[:, -1:] if opts.warm_start else None
                logits, s, loops = run_loop(model, tok[:, None], cache.pos, cache, rule, max_depth, s0=s0,
                                            init_generator=init_gen)
                cache.commit(1, loops)
            probe += rule.probe_evals
    finally:
        model.train(was_training)
    return GenerationResult(tokens=torch.cat([ids, torch.stack(new, 1)], dim=1), prompt_len=P,
                            loops=torch.stack(used, 1), finished=finished, probe_evals=probe,
                            eos_id=opts.eos_id, logprobs=torch.stack(logps, 1), greedy=torch.stack(greedy, 1))


def generate_many(model, prompts: Sequence[Sequence[int]], opts: GenerateOptions, batch_size: int = 64
                  ) -> list[tuple[list[int], list[int]]]:
    """Prompts of any lengths -> [(new tokens without EOS, loops per generated token)] in order.

    Prompts of equal length are batched together (no padding, so batching never changes a result
    beyond floating-point reduction order)."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[Optional[tuple[list[int], list[int]]]] = [None] * len(prompts)
    for _, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            res = generate(model, torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long), opts)
            for row, i in enumerate(chunk):
                n = len(res.new_tokens(row, keep_eos=True))
                out[i] = (res.new_tokens(row), [int(x) for x in res.loops[row, :n].tolist()])
    return out  # type: ignore[return-value]
