"""Host allocator settings: what glibc does with training-sized blocks, and who applies them."""
import json
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, json, sys
import torch
from stars_scale.train.host_malloc import keep_freed_memory, return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = {"tuned": keep_freed_memory, "measure": return_freed_memory, "system": lambda: False}[sys.argv[1]]()
m0 = libc.mallinfo2()
blocks = [torch.ones(1 << 20) for _ in range(16)]  # 16 activation-sized blocks of 4 MiB
m1 = libc.mallinfo2()
del blocks
m2 = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": m1.hblks - m0.hblks, "kept_mb": m2.fordblks / 2**20}))
"""


def probe(mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(res.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_keeps_freed_blocks_for_reuse_and_measure_mode_returns_them():
    system, tuned, measure = probe("system"), probe("tuned"), probe("measure")
    # glibc's defaults: every 4 MiB block is a fresh mmap, unmapped again on free
    assert system == {"applied": False, "mmapped": 16, "kept_mb": pytest.approx(system["kept_mb"])}
    assert system["kept_mb"] < 4
    # tuned: served from the heap and still held by the process after the free (64 MiB)
    assert tuned["applied"] is True and tuned["mmapped"] == 0 and tuned["kept_mb"] >= 64
    # measurement mode: mmap'd and returned, so the resident high-water mark is the step's own
    assert measure["applied"] is True and measure["mmapped"] == 16 and measure["kept_mb"] < 4


@pytest.mark.parametrize("setting,calls", [("tuned", 1), ("system", 0)])
def test_trainer_applies_the_configured_host_malloc_on_cpu(tmp_path, monkeypatch, setting, calls):
    from stars_scale.config import config_from_dict
    from stars_scale.train import trainer as trainer_mod

    seen = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: seen.append(1) or True)
    cfg = config_from_dict({"model": {"vocab_size": 15, "hidden": 16, "heads": 2, "max_seq_len": 16},
                            "data": {"digits": 3, "batch_size": 4, "test_size": 8},
                            "train": {"steps": 1, "progress": False, "host_malloc": setting},
                            "tracking": {"mlflow": False}})
    trainer_mod.Trainer(cfg, tmp_path / "run")
    assert len(seen) == calls


def test_host_malloc_setting_is_validated():
    from stars_scale.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="train.host_malloc"):
        config_from_dict({"train": {"host_malloc": "fast"}})
