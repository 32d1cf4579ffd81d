"""Variable-binding chains: a task whose difficulty is the number of lookups the answer needs.

A problem is `S` binding statements of two tokens each, `<variable><value>`, where the value is
a digit or another variable, followed by a query `<variable>?`; the answer is the digit the
queried variable resolves to (one token), then EOS::

    tokens:  a 3  c 7  b a  d b  ...  d ?  3 <eos>
    read as: a=3; c=7; b=a; d=b; ...  d?   -> 3

The statements form disjoint chains, each rooted at a digit (`a=3; b=a; d=b` is one chain of
length 3). With `order: program` (the default) they are written as a program would be: every
variable bound before it is referenced, the chains randomly interleaved; `order: shuffled` writes
them in any order. In program order a variable's binding is the previous occurrence of its
token, so one lookup is one induction-head step (attend to the previous occurrence, copy the
token after it), and every statement can resolve its value backwards under causal attention; in
shuffled order a forward reference can be resolved only at the query, which sees the whole
prompt. The queried variable sits at depth `k` of its chain:
following its binding, then that variable's binding, ... reaches a digit after exactly `k`
lookups. `k` is the problem's **difficulty**. The other `S - k` statements form `C - 1`
distractor chains (`chains = C`, lengths a uniformly random composition of `S - k`), and the C
chains are rooted at C *distinct* digits. So the prompt length `2S + 2` and the number of
candidate answers (C, guessing gives 1/C) are the same for every difficulty: a harder problem
differs only in how many lookups it takes, and a model's depth is the only budget that grows
with it. (An earlier draft filled the prompt with chains of random number: the hardest problems
then had a single chain, hence a single digit in the prompt, and were solved at r = 1 by
copying it.) Variables are drawn
from the first `V` letters, each bound exactly once.

Each loop of an attention-bearing block can resolve (at least) one lookup per statement, so a
looped model should need about `k` loops (or ~log2 k with pointer doubling) for difficulty `k`.

Training problems draw `k` uniformly from `difficulty = (lo, hi)`; the test set holds
`test_size` problems split evenly over `test_difficulty`, fixed by (seed, "test"). Training
problems that equal a test problem are redrawn, so the two never overlap. Training batches are
a pure function of (seed, step, microbatch, dp_rank), as in the arithmetic task. The loss covers
the answer and EOS; exact match needs both right (EOS is learnt at once; the answer is the
task).
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import torch

from stars_scale.config import chains_error
from stars_scale.loss import IGNORE

DIGITS = [str(i) for i in range(10)]
LETTERS = list(string.ascii_lowercase)
VOCAB = DIGITS + LETTERS + ["?", "<pad>", "<eos>"]
QUERY, PAD, EOS = len(VOCAB) - 3, len(VOCAB) - 2, len(VOCAB) - 1
VOCAB_SIZE = len(VOCAB)
_VAR0 = 10  # token id of the first variable ("a")
_TEST_SALT = 0xC4A1
_TRAIN_SALT = 0xC4A2
_SINGLE = {s: i for i, s in enumerate(VOCAB) if len(s) == 1}


def decode_tokens(tokens) -> str:
    return "".join(VOCAB[int(t)] if 0 <= int(t) < VOCAB_SIZE else "?" for t in tokens)


def encode_text(text: str) -> list[int]:
    """Prompt text -> token ids: one character per token, whitespace ignored (`"a3 ba b?"`)."""
    bad = sorted({ch for ch in text if not ch.isspace() and ch not in _SINGLE})
    if bad:
        raise ValueError(f"characters {bad} are not in the chains vocabulary (digits, a-z, '?')")
    return [_SINGLE[ch] for ch in text if not ch.isspace()]


def format_problem(tokens) -> str:
    """`b=a; c=7; ...; d? -> 3` for reports (statements are token pairs up to the query)."""
    toks = [int(t) for t in tokens]
    q = toks.index(QUERY)
    stmts = "; ".join(f"{VOCAB[toks[i]]}={VOCAB[toks[i + 1]]}" for i in range(0, q - 1, 2))
    rest = decode_tokens(t for t in toks[q + 1:] if t not in (EOS, PAD))
    return f"{stmts}; {VOCAB[toks[q - 1]]}?" + (f" -> {rest}" if rest else "")


def bindings(prompt, value_first: bool = False) -> dict[int, int]:
    """{variable: value} of the prompt's statements, in the order they are written."""
    toks = [int(t) for t in prompt]
    q = toks.index(QUERY)
    pairs = [(toks[i], toks[i + 1]) for i in range(0, q - 1, 2)]
    return {b: a for a, b in pairs} if value_first else dict(pairs)


def _follow(binding: dict[int, int], v: int) -> tuple[int, int]:
    """Follow `binding` from token `v` to a digit: (digit, lookups); ValueError on a cycle."""
    hops = 0
    while v >= _VAR0:
        if hops > len(binding):
            raise ValueError("the bindings form a cycle")
        v, hops = binding[v], hops + 1
    return v, hops


def solve(prompt, value_first: bool = False) -> tuple[int, int]:
    """Brute force from the prompt's tokens alone: (answer digit, lookups needed)."""
    toks = [int(t) for t in prompt]
    q = toks.index(QUERY)
    binding = bindings(toks, value_first)
    if len(binding) != (q - 1) // 2:
        raise ValueError("a variable is bound twice")
    return _follow(binding, toks[q - 1])


def resolved(prompts, value_first: bool = False) -> np.ndarray:
    """[B, 2S+2] prompts -> [B, S]: the digit each statement's variable resolves to (brute force)."""
    rows = []
    for p in np.asarray(prompts):
        binding = bindings(p, value_first)
        rows.append([_follow(binding, v)[0] for v in binding.values()])
    return np.array(rows, dtype=np.int64)


def parse_difficulty(text: str) -> tuple[int, int]:
    """`"LO..HI"` (or one number) -> (lo, hi) with 1 <= lo <= hi; ValueError otherwise."""
    parts = text.split("..")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi:
        raise ValueError(f"expected LO..HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


@dataclass
class ChainsTask:
    kind = "chains"
    vocab_size = VOCAB_SIZE
    statements: int = 12  # S: binding statements per problem (the prompt is 2S + 2 tokens)
    variables: int = 16  # V: variables drawn from the first V letters (V >= S)
    difficulty: tuple[int, int] = (1, 4)  # training lookups, uniform over [lo, hi]
    test_difficulty: tuple[int, int] = (1, 4)
    chains: int = 3  # C: chains per problem (the query's and C - 1 distractors), rooted at distinct digits
    order: str = "program"  # "program": every variable bound before it is referenced; "shuffled": any order
    dense: bool = False  # training labels also give every statement's resolved digit (at its second token)
    matched: bool = False  # all chains as long as the query's; spare statements bound to the roots in turn
    names: str = "random"  # "random": variables drawn at random; "slot": statement s binds the s-th letter
    value_first: bool = False  # statements written `<value><variable>` (value flows forward) instead of `<variable><value>`
    seed: int = 0
    test_size: int = 512
    train_size: int = 0  # accepted for symmetry with arithmetic; 0 only (fresh problems every step)
    _test_keys: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        why = chains_error(self.statements, self.variables, self.difficulty, self.test_difficulty, self.chains,
                           self.train_size, matched=self.matched)
        if why:
            raise ValueError(why)
        self.difficulty = tuple(int(x) for x in self.difficulty)
        self.test_difficulty = tuple(int(x) for x in self.test_difficulty)
        S = self.statements
        if self.names not in ("random", "slot"):
            raise ValueError(f"data.names must be random or slot, got {self.names!r}")
        if self.order not in ("program", "shuffled"):
            raise ValueError(f"data.order must be program or shuffled, got {self.order!r}")
        if self.test_size < 1:
            raise ValueError(f"data.test_size must be >= 1, got {self.test_size}")
        self.prompt_len = 2 * S + 2
        self.seq_len = 2 * S + 4  # prompt, answer digit, EOS
        lo, hi = self.test_difficulty
        levels = hi - lo + 1
        k = lo + (np.arange(self.test_size) * levels) // self.test_size  # even split, sorted by difficulty
        rng = np.random.default_rng([self.seed, _TEST_SALT])
        self.test_tokens = self._problems(rng, k)
        self.test_levels = k.astype(np.int64)
        self._test_keys = {row.tobytes() for row in self.test_tokens}

    # ------------------------------------------------------------------ problems

    def _problem(self, rng: np.random.Generator, k: int) -> np.ndarray:
        S = self.statements
        names = _VAR0 + rng.permutation(self.variables)[:S]
        stmts = []  # (variable, value) pairs
        owner = []  # the chain of each statement
        pos = n_chains = 0

        roots = rng.choice(10, size=self.chains, replace=False)

        def chain(length: int) -> int:
            nonlocal pos, n_chains
            value = int(roots[n_chains])
            for _ in range(length):
                stmts.append((int(names[pos]), value))
                owner.append(n_chains)
                value = int(names[pos])
                pos += 1
            n_chains += 1
            return value  # the chain's last variable

        query = chain(k)
        if self.matched:  # C chains of k; the rest bound straight to the C root digits in turn, from a random one
            for _ in range(self.chains - 1):
                chain(k)
            first = int(rng.integers(self.chains))
            for j in range(S - self.chains * k):
                stmts.append((int(names[pos]), int(roots[(first + j) % self.chains])))
                owner.append(n_chains)
                pos, n_chains = pos + 1, n_chains + 1
        else:
            rest, parts = S - k, self.chains - 1  # a uniform composition of `rest` into `parts` positive lengths
            cuts = np.sort(rng.choice(np.arange(1, rest), size=parts - 1, replace=False)) if parts > 1 else []
            for length in np.diff([0, *cuts, rest]):
                chain(int(length))
        if self.order == "shuffled":
            order = rng.permutation(S)
        else:  # program: a random interleaving of the chains, each bound before it is referenced
            taken = [owner.index(c) for c in range(n_chains)]  # a chain's statements are contiguous
            order = []
            for c in np.asarray(owner)[rng.permutation(S)]:
                order.append(taken[c])
                taken[c] += 1
        if self.names == "slot":  # the statement in slot s binds the s-th letter: a lookup is by position
            rename = {stmts[i][0]: _VAR0 + slot for slot, i in enumerate(order)}
            stmts = [(rename[x], rename.get(y, y)) for x, y in stmts]
            query = rename[query]
        out = np.empty(2 * S + 2, dtype=np.int64)
        for slot, i in enumerate(order):
            out[2 * slot], out[2 * slot + 1] = stmts[i][::-1] if self.value_first else stmts[i]
        out[-2], out[-1] = query, QUERY
        return out

    def _problems(self, rng: np.random.Generator, levels: np.ndarray) -> np.ndarray:
        return np.stack([self._problem(rng, int(k)) for k in levels])

    def encode(self, prompts: np.ndarray, dense: bool = False) -> dict[str, torch.Tensor]:
        """Prompts [B, 2S+2] -> {"input_ids", "labels"} with the answer and EOS appended. `dense`: the
        value token of every statement is also labelled with the digit its variable resolves to."""
        answers = np.array([solve(p, self.value_first)[0] for p in prompts], dtype=np.int64)
        B = len(prompts)
        tokens = np.concatenate([prompts, answers[:, None], np.full((B, 1), EOS, dtype=np.int64)], axis=1)
        labels = np.full_like(tokens, IGNORE)
        start = self.prompt_len - 1  # "?" predicts the answer, the answer predicts EOS
        labels[:, start:-1] = tokens[:, start + 1:]
        if dense:
            labels[:, 1:start - 1:2] = resolved(prompts, self.value_first)
        return {"input_ids": torch.from_numpy(tokens), "labels": torch.from_numpy(labels)}

    def train_batch(self, step: int, micro: int, batch_size: int, dp_rank: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _TRAIN_SALT, step, micro, dp_rank])
        lo, hi = self.difficulty
        levels = rng.integers(lo, hi + 1, size=batch_size)
        prompts = self._problems(rng, levels)
        for i in range(batch_size):  # never a test problem
            while prompts[i].tobytes() in self._test_keys:
                prompts[i] = self._problem(rng, int(levels[i]))
        return self.encode(prompts, dense=self.dense)

    def test_batch(self, limit: int | None = None) -> dict[str, torch.Tensor]:
        idx = self._spread(limit)
        batch = self.encode(self.test_tokens[idx])
        batch["difficulty"] = torch.from_numpy(self.test_levels[idx])
        return batch

    def _spread(self, limit: int | None) -> np.ndarray:
        """`limit` test problems spread evenly over the difficulties (all of them when None)."""
        n = self.test_size
        if limit is None or limit >= n:
            return np.arange(n)
        return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))

    def is_test_problem(self, prompt) -> bool:
        return np.asarray(prompt, dtype=np.int64).tobytes() in self._test_keys
