"""The addition task: format, split, and exact match = greedy decoding."""
import numpy as np
import torch

from stars_scale.config import ModelConfig
from stars_scale.data.arithmetic import EOS, IGNORE, SPACE, VOCAB_SIZE, ArithmeticTask, decode_tokens
from stars_scale.model import LoopedLM


def test_format_reversed_answer_and_labels():
    task = ArithmeticTask(digits=3, seed=0, test_size=16)
    b = task.encode(np.array([123 * 1000 + 989]))
    assert decode_tokens(b["input_ids"][0]) == "123+989= 2111<eos>"  # 1112 reversed
    labels = b["labels"][0].tolist()
    assert labels[: task.prompt_len - 1] == [IGNORE] * (task.prompt_len - 1)
    assert labels[task.prompt_len - 1] == SPACE and labels[-2] == EOS and labels[-1] == IGNORE
    assert VOCAB_SIZE == 15 and b["input_ids"].shape[1] == task.seq_len == 14


def test_reversed_operands_put_each_answer_digit_at_one_offset_from_its_operands():
    plain = ArithmeticTask(digits=3, seed=0, test_size=16)
    task = ArithmeticTask(digits=3, seed=0, test_size=16, reverse_operands=True)
    b = task.encode(np.array([120 * 1000 + 985]))
    assert decode_tokens(b["input_ids"][0]) == "021+589= 5011<eos>"  # 120 + 985 = 1105, all LSD first
    # only the prompt differs: same labels, same test split, same training problems
    assert torch.equal(b["labels"], plain.encode(np.array([120 * 1000 + 985]))["labels"])
    assert np.array_equal(task.test_codes, plain.test_codes)
    for row in task.train_batch(3, 0, 64)["input_ids"]:
        a, rest = decode_tokens(row).split("+")
        b_, ans = rest.split("= ")
        assert int(ans.replace("<eos>", "")[::-1]) == int(a[::-1]) + int(b_[::-1])
    # digit i (of 10^i) of a sits at position i, of b at n + 1 + i, of the answer at prompt_len + 1 + i:
    # the answer is at the same offset from both operand digits it needs, for every i
    ids = task.encode(np.array([123 * 1000 + 456]))["input_ids"][0].tolist()
    for i in range(3):
        assert ids[i] == (123 // 10**i) % 10 and ids[4 + i] == (456 // 10**i) % 10
        assert ids[task.prompt_len + 1 + i] == (579 // 10**i) % 10


def test_reverse_operands_is_a_config_field():
    from stars_scale.config import config_from_dict
    from stars_scale.data.sources import build_task

    cfg = config_from_dict({"data": {"digits": 2, "reverse_operands": True, "test_size": 8}})
    assert decode_tokens(build_task(cfg).encode(np.array([12 * 100 + 34]))["input_ids"][0]) == "21+43= 640<eos>"


def test_every_training_sum_is_correct():
    task = ArithmeticTask(digits=4, seed=1, test_size=32)
    for row in task.train_batch(3, 0, 64)["input_ids"]:
        s = decode_tokens(row)
        a, rest = s.split("+")
        b, ans = rest.split("= ")
        assert int(ans.replace("<eos>", "")[::-1]) == int(a) + int(b)


def test_split_is_deterministic_and_disjoint():
    t1, t2 = ArithmeticTask(3, seed=5, test_size=200), ArithmeticTask(3, seed=5, test_size=200)
    assert np.array_equal(t1.test_codes, t2.test_codes)
    assert not np.array_equal(t1.test_codes, ArithmeticTask(3, seed=6, test_size=200).test_codes)
    test = set(t1.test_codes.tolist())
    for step in range(50):
        ids = t1.train_batch(step, 0, 256)["input_ids"]
        for row in ids:
            s = decode_tokens(row)
            a, b = s.split("=")[0].split("+")
            assert int(a) * 1000 + int(b) not in test
    assert torch.equal(t1.train_batch(9, 0, 8)["input_ids"], t2.train_batch(9, 0, 8)["input_ids"])
    assert not torch.equal(t1.train_batch(9, 0, 8, dp_rank=0)["input_ids"],
                           t1.train_batch(9, 0, 8, dp_rank=1)["input_ids"])


def test_exact_match_equals_greedy_decoding():
    torch.manual_seed(0)
    task = ArithmeticTask(digits=2, seed=0, test_size=64)
    model = LoopedLM(ModelConfig(vocab_size=15, hidden=32, heads=2, max_seq_len=16)).eval()
    batch = task.test_batch()
    # make the model right on some problems: nudge the head towards the answers via a few steps
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(batch["input_ids"], 0, 2)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fast = ArithmeticTask.exact_match(model(batch["input_ids"], 2, 0).logits, batch["labels"])
        slow_seq = task.greedy_decode(model, batch["input_ids"], n_free=2)
        slow = (slow_seq[:, task.prompt_len:] == batch["input_ids"][:, task.prompt_len:]).all(-1)
    assert torch.equal(fast, slow)
    assert 0 < int(fast.sum()) < 64  # the check covered both right and wrong answers
