"""n-digit + n-digit addition in the STARS format.

A sample reads ``"a+b= " + reversed(a+b) + EOS`` over a 15-token vocabulary (digits, ``+``,
``=``, space, PAD, EOS), as in STARS' ``train_addition``. With ``reverse_operands`` the operands
are written least-significant digit first too, so answer digit i and the operand digits it needs
sit at the same relative offset for every i (the main job uses this with RoPE). Operands are written with exactly n
digits (zero-padded) and the answer with n+1, so every sequence has the same length (3n + 5)
and batches need no padding. The loss covers the answer only: the space after ``=``, the
reversed digits and EOS (labels are -100 elsewhere).

Train/test split: the test set is a fixed draw from an RNG seeded by (seed, "test"); training
problems that hit a test problem are replaced, so the two never overlap. Training batches are a
pure function of (seed, step, microbatch, dp_rank): the stream needs no iterator state to resume
exactly.

Exact match with greedy decoding equals "the teacher-forced argmax is right at every answer
position" (greedy decoding diverges from the target only after its first wrong token), so
accuracy is computed in one forward pass; `greedy_decode` is kept to prove that equivalence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stars_scale.config import arithmetic_error
from stars_scale.loss import IGNORE

VOCAB = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "+", "=", " ", "<pad>", "<eos>"]
PLUS, EQ, SPACE, PAD, EOS = 10, 11, 12, 13, 14
VOCAB_SIZE = len(VOCAB)
_TEST_SALT = 0x7E57
_TRAIN_SALT = 0x7A1


def decode_tokens(tokens) -> str:
    return "".join(VOCAB[int(t)] if 0 <= int(t) < VOCAB_SIZE else "?" for t in tokens)


@dataclass
class ArithmeticTask:
    digits: int = 3
    seed: int = 0
    test_size: int = 512
    train_size: int = 0  # 0: a fresh draw every step; N: a fixed set of N training problems
    reverse_answer: bool = True
    reverse_operands: bool = False  # operands least-significant digit first, like the answer

    def __post_init__(self) -> None:
        n = self.digits
        self.modulus = 10 ** n
        self.prompt_len = 2 * n + 2  # "a+b="
        self.seq_len = 3 * n + 5  # prompt, space, n+1 answer digits, EOS
        space = self.modulus * self.modulus
        why = arithmetic_error(n, self.test_size, self.train_size)
        if why:
            raise ValueError(why)
        rng = np.random.default_rng([self.seed, _TEST_SALT])
        codes = rng.choice(space, size=self.test_size, replace=False) if space < 2**40 else \
            np.unique(rng.integers(0, space, size=self.test_size))
        self.test_codes = np.sort(codes.astype(np.int64))
        self._test_set = set(self.test_codes.tolist())
        self._fixed_train = None
        if self.train_size:
            rng = np.random.default_rng([self.seed, _TRAIN_SALT, 0])
            self._fixed_train = self._draw(rng, self.train_size)

    # ------------------------------------------------------------------ problems

    def _draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        space = self.modulus * self.modulus
        codes = rng.integers(0, space, size=count, dtype=np.int64)
        clash = np.isin(codes, self.test_codes)
        while clash.any():  # resample problems that belong to the test set
            codes[clash] = rng.integers(0, space, size=int(clash.sum()), dtype=np.int64)
            clash = np.isin(codes, self.test_codes)
        return codes

    def encode(self, codes: np.ndarray) -> dict[str, torch.Tensor]:
        """Problem codes (a * 10^n + b) -> {"input_ids": [B, T], "labels": [B, T]}."""
        n = self.digits
        a, b = codes // self.modulus, codes % self.modulus
        c = a + b
        powers_n = 10 ** np.arange(n - 1, -1, -1, dtype=np.int64)  # most significant first
        powers_c = 10 ** np.arange(n, -1, -1, dtype=np.int64)
        da = (a[:, None] // powers_n) % 10
        db = (b[:, None] // powers_n) % 10
        dc = (c[:, None] // powers_c) % 10
        if self.reverse_operands:
            da, db = da[:, ::-1], db[:, ::-1]
        if self.reverse_answer:
            dc = dc[:, ::-1]
        B = len(codes)
        col = lambda v: np.full((B, 1), v, dtype=np.int64)  # noqa: E731
        tokens = np.concatenate([da, col(PLUS), db, col(EQ), col(SPACE), dc, col(EOS)], axis=1)
        labels = np.full_like(tokens, IGNORE)
        start = self.prompt_len - 1  # the position of "=" predicts the space
        labels[:, start:-1] = tokens[:, start + 1:]
        return {"input_ids": torch.from_numpy(tokens.copy()), "labels": torch.from_numpy(labels)}

    def train_batch(self, step: int, micro: int, batch_size: int, dp_rank: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _TRAIN_SALT, 1, step, micro, dp_rank])
        if self._fixed_train is not None:
            codes = self._fixed_train[rng.integers(0, len(self._fixed_train), size=batch_size)]
        else:
            codes = self._draw(rng, batch_size)
        return self.encode(codes)

    def test_batch(self, limit: int | None = None) -> dict[str, torch.Tensor]:
        codes = self.test_codes if limit is None else self.test_codes[:limit]
        return self.encode(codes)

    def is_test_problem(self, code: int) -> bool:
        return int(code) in self._test_set

    # ------------------------------------------------------------------ scoring

    @staticmethod
    def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample bool: the argmax is right at every labelled (answer) position."""
        mask = labels != IGNORE
        right = (logits.argmax(-1) == labels) | ~mask
        return right.all(dim=-1)

    @torch.no_grad()
    def greedy_decode(self, model, input_ids: torch.Tensor, n_free: int, n_grad: int = 0) -> torch.Tensor:
        """Greedy generation of the answer from the prompt (the slow, literal definition)."""
        seq = input_ids[:, : self.prompt_len]
        for _ in range(self.seq_len - self.prompt_len):
            logits = model(seq, n_free=n_free, n_grad=n_grad).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq
