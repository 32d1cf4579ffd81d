"""lm-evaluation-harness integration: the `stars` model class and a depth-scaling driver.

    pip install -e '.[eval]'
    stars-eval lm --checkpoint RUN --tasks hellaswag,gsm8k --depths 4,8,16,32 [--exit contraction --tol 1e-3]

`StarsLM` implements lm-eval's three request types on a looped model at a fixed depth or under an
exit rule:
- loglikelihood(context, continuation): Σ log p(continuation | context) and whether it is the
  greedy continuation. Fixed depth: one forward pass per batch of equal-length requests. Exit
  rule: the continuation is fed token by token through the generator (KV cache across loops),
  each token's depth chosen by the rule, and scored (`generate(..., forced=...)`).
- loglikelihood_rolling(text): the same over lm-eval's rolling windows of max_seq_len tokens,
  the first token conditioned on the EOS token.
- generate_until(context, gen_kwargs): the generator, stopped at EOS, at `max_gen_toks` (capped
  by the model's max_seq_len; the context is cut from the left to make room) or at the first
  `until` string.
Empty contexts are conditioned on the EOS token (lm-eval's convention for models without BOS).

Also usable from lm-eval's own entry points after `import stars_scale.eval.lm_harness`
(`--model stars --model_args checkpoint=DIR,depth=8`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stars_scale.errors import UserError
from stars_scale.generate import GenerateOptions, generate, generate_many

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the `eval` extra
    raise UserError("lm-evaluation-harness is not installed: pip install -e '.[eval]' "
                    f"(import failed: {e})") from None


@register_model("stars")
class StarsLM(LM):
    def __init__(self, checkpoint: str | None = None, depth: int | None = None, exit: str | None = None,
                 tol: float | None = None, max_depth: int = 64, cache: str = "full", cache_slots: int = 4,
                 rho_iters: int = 0, warm_start: bool = False, tokenizer: str | None = None, batch_size: int = 16,
                 model=None, run=None, codec=None):
        super().__init__()
        from stars_scale.generate.load import default_depth, load_codec, load_model

        if model is None:
            if checkpoint is None:
                raise UserError("the stars model needs checkpoint=DIR")
            run, model, wdir = load_model(checkpoint)
            codec = codec or load_codec(run, wdir, tokenizer)
        if codec is None:
            raise UserError("StarsLM(model=...) needs codec=")
        self.model, self.run, self.codec = model, run, codec
        self.batch_size = int(batch_size)
        self.opts = GenerateOptions(max_new_tokens=1, depth=int(depth) if depth else default_depth(run),
                                    exit=exit or "fixed", tol=float(tol) if tol is not None else None,
                                    max_depth=int(max_depth), cache=cache, cache_slots=int(cache_slots),
                                    rho_iters=int(rho_iters), warm_start=_bool(warm_start), eos_id=codec.eos_id)
        try:
            self.opts.validate()  # the exit rule's own checks included
        except ValueError as e:
            raise UserError(f"stars model args: {e}") from None
        self.max_len = model.cfg.max_seq_len
        self.loops: list[int] = []  # loops per scored or generated token (exit rules)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if k == "batch_size" and v})
        return cls(**args)

    # ------------------------------------------------------------------ helpers

    @property
    def prefix_id(self) -> int:
        if self.codec.eos_id is None:
            raise UserError(f"tokenizer {self.codec.name}: no EOS token to condition an empty context on")
        return self.codec.eos_id

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # encode the whole string and split at the context's length, so that a tokenizer merging
        # across the boundary does not change the continuation's tokens (lm-eval's convention)
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.codec.encode(context + continuation)
        ctx = self.codec.encode(context) if context else []
        cont = whole[len(ctx):]
        return (ctx or [self.prefix_id]), cont

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Σ log p(cont | ctx) and greedy-ness for token pairs (context cut from the left to fit)."""
        out: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        groups: dict[tuple[int, int], list[int]] = {}
        fitted = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise UserError("lm-eval asked for an empty continuation")
            cont = cont[-self.max_len:]
            keep = max(1, self.max_len + 1 - len(cont))
            ctx = ctx[-keep:]
            fitted.append((ctx, cont))
            groups.setdefault((len(ctx), len(cont)), []).append(i)
        for (n_ctx, n_cont), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                ctx = torch.tensor([fitted[i][0] for i in chunk])
                cont = torch.tensor([fitted[i][1] for i in chunk])
                lp, greedy = self._score_batch(ctx, cont)
                for row, i in enumerate(chunk):
                    out[i] = (float(lp[row].sum()), bool(greedy[row].all()))
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, ctx: torch.Tensor, cont: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        ctx, cont = ctx.to(device), cont.to(device)
        if self.opts.exit == "fixed":  # one forward pass: equal to the cached path (tests/test_generate.py)
            seq = torch.cat([ctx, cont], 1)[:, :-1]
            logits = self.model(seq, n_free=self.opts.depth, n_grad=0).logits[:, ctx.shape[1] - 1:].float()
            logp = torch.log_softmax(logits, -1)
            return logp.gather(2, cont[..., None])[..., 0], logp.argmax(-1) == cont
        res = generate(self.model, ctx, self.opts, forced=cont)
        self.loops += res.loops.flatten().tolist()
        return res.logprobs, res.greedy

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._pair(*r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, r in enumerate(requests):
            tokens = self.codec.encode(r.args[0])
            for w in get_rolling_token_windows(tokens, self.prefix_id, self.max_len, 1):
                pairs.append(make_disjoint_window(w))
                owner.append(i)
        total = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(pairs)):
            total[i] += lp
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
        for i, r in enumerate(requests):
            context, kw = r.args[0], dict(r.args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ctx = self.codec.encode(context) if context else [self.prefix_id]
            n_new = max(1, min(int(kw.get("max_gen_toks", 256)), self.max_len - 1))
            ctx = ctx[-(self.max_len - n_new + 1):]
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            groups.setdefault((n_new, temp), []).append((i, ctx, until))
        for (n_new, temp), items in groups.items():
            opts = GenerateOptions(**{**self.opts.__dict__, "max_new_tokens": n_new, "temperature": temp})
            results = generate_many(self.model, [ctx for _, ctx, _ in items], opts, batch_size=self.batch_size)
            for (i, _, until), (toks, loops) in zip(items, results):
                self.loops += loops
                text = self.codec.decode(toks)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                out[i] = text
        return out  # type: ignore[return-value]


def _bool(x) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------- depth scaling


def main_score(task_result: dict, metric_list: list | None = None) -> tuple[str, float] | None:
    """The headline metric of one task's lm-eval result: the task's first configured metric
    ("exact_match,none" -> exact_match), else the first "metric,filter" entry that is a number."""
    keys = [k for k, v in task_result.items() if "," in k and "_stderr" not in k
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    first = (metric_list or [{}])[0].get("metric") if metric_list else None
    keys.sort(key=lambda k: k.split(",")[0] != first)  # stable: the configured metric first
    return (keys[0].split(",")[0], float(task_result[keys[0]])) if keys else None


def lm_depth_scaling(model, run, codec, tasks: list[str], depths: list[int], *, exit: str | None = None,
                     tol: float | None = None, limit: float | None = None, include_path: str | None = None,
                     batch_size: int = 16, cache: str = "full", cache_slots: int = 4, rho_iters: int = 0,
                     num_fewshot: int | None = None, seed: int = 0) -> dict:
    """Run lm-eval once per depth (fixed depth, or the exit rule's max_depth) -> results table."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    table: dict = {"depths": depths, "exit": exit, "tol": tol, "limit": limit, "tasks": {}, "mean_loops": [],
                   "p99_loops": []}
    for d in depths:
        kw = dict(depth=d) if not exit else dict(exit=exit, tol=tol, max_depth=d)
        lm = StarsLM(model=model, run=run, codec=codec, batch_size=batch_size, cache=cache, cache_slots=cache_slots,
                     rho_iters=rho_iters, **kw)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
        for task, r in res["results"].items():
            score = main_score(r, (res.get("configs", {}).get(task) or {}).get("metric_list"))
            if score is None:
                continue
            entry = table["tasks"].setdefault(task, {"metric": score[0], "scores": []})
            entry["scores"].append(score[1])
        loops = np.asarray(lm.loops or [d], dtype=np.float64)  # fixed depth scores in one pass: d each
        table["mean_loops"].append(float(loops.mean()))
        table["p99_loops"].append(float(np.percentile(loops, 99)))
    return table


def plot_lm_depth_scaling(table: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stars_scale.eval.exit_accuracy import save_log2_plot

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for task, entry in sorted(table["tasks"].items()):
        ax.plot(table["depths"], entry["scores"], marker="o", label=f"{task} ({entry['metric']})")
    ax.set_xlabel("max loop depth (exit: " + table["exit"] + ")" if table["exit"] else "loop depth r")
    ax.set_ylabel("score")
    save_log2_plot(fig, ax, path, title)
