"""Bad input to stars-convert: one clear line naming the file and the tensor, exit 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from stars_scale.cli.convert import main as convert_main
from stars_scale.convert import export_checkpoint, import_checkpoint
from stars_scale.errors import UserError


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit 2 and exactly one 'error:' line on stderr; return it."""
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_directory_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, ["import", "--from", "huginn", str(tmp_path / "empty"),
                              "--out", str(tmp_path / "out")])
    assert "config.json" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "out").exists()


def test_mismatched_shape_names_file_and_tensor(tmp_path, llama_dir, capsys):
    d = copy_dir(llama_dir, tmp_path / "bad")
    w = load_file(str(d / "model.safetensors"))
    name = "model.layers.2.self_attn.k_proj.weight"
    w[name] = torch.zeros(3, 16)
    save_file(w, str(d / "model.safetensors"))
    line = cli_error(capsys, ["import", "--from", "llama", str(d), "--out", str(tmp_path / "out"),
                              "--prelude", "0-1", "--core", "2-3"])
    assert str(d / "model.safetensors") in line and name in line and "[3, 16]" in line
    assert not (tmp_path / "out").exists()


def test_missing_tensor_names_it(tmp_path, llama_dir):
    d = copy_dir(llama_dir, tmp_path / "bad")
    w = load_file(str(d / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    save_file(w, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight not found"):
        import_checkpoint("llama", d, tmp_path / "out", core="0-3")


def test_unknown_architecture(tmp_path, llama_dir, capsys):
    d = copy_dir(llama_dir, tmp_path / "gpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, ["import", "--from", "llama", str(d), "--out", str(tmp_path / "o"),
                              "--core", "0"])
    assert "unknown architecture" in line and "gpt2" in line and "config.json" in line
    line = cli_error(capsys, ["import", "--from", "huginn", str(d), "--out", str(tmp_path / "o")])
    assert "not a Huginn" in line and "gpt2" in line


def test_unsupported_variant_is_refused(tmp_path, llama_dir):
    d = copy_dir(llama_dir, tmp_path / "scaled")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="rope_type 'llama3' is not supported"):
        import_checkpoint("llama", d, tmp_path / "out", core="0")


@pytest.mark.parametrize("flag,spec,msg", [
    ("--core", "2-9", "outside the model"),
    ("--coda", "-1", "expected layer ranges"),
    ("--core", "3-1", "start > end"),
    ("--prelude", "0,0", "listed twice"),
])
def test_bad_layer_ranges(tmp_path, llama_dir, capsys, flag, spec, msg):
    argv = ["import", "--from", "llama", str(llama_dir), "--out", str(tmp_path / "o"), "--core", "1"]
    if flag == "--core":
        argv[-1] = spec
    else:
        argv += [flag, spec]
    line = cli_error(capsys, argv)
    assert msg in line and flag in line
    if msg == "outside the model":
        assert "num_hidden_layers=4, layers 0-3" in line and "config.json" in line


def test_core_is_required_and_only_for_llama(tmp_path, llama_dir, capsys):
    assert "--core is required" in cli_error(
        capsys, ["import", "--from", "llama", str(llama_dir), "--out", str(tmp_path / "o")])
    assert "--from llama only" in cli_error(
        capsys, ["import", "--from", "ouro", str(llama_dir), "--out", str(tmp_path / "o"), "--core", "1"])


def test_index_pointing_to_missing_shard(tmp_path, llama_dir):
    d = copy_dir(llama_dir, tmp_path / "sharded")
    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    with pytest.raises(UserError, match="model-00001-of-00002.safetensors.*not a file"):
        import_checkpoint("llama", d, tmp_path / "out", core="0")


def test_existing_output_needs_overwrite(tmp_path, llama_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli_error(capsys, ["import", "--from", "llama", str(llama_dir), "--out", str(out), "--core", "1"])
    assert "--overwrite" in line and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what stars-convert wrote: a foreign file is kept and refused
    line = cli_error(capsys, ["import", "--from", "llama", str(llama_dir), "--out", str(out), "--core", "1",
                              "--overwrite"])
    assert "'keep.txt'" in line and "refusing" in line and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the empty directory, then over its own output
        assert convert_main(["import", "--from", "llama", str(llama_dir), "--out", str(out), "--core", "1",
                             "--overwrite"]) == 0
    assert (out / "config.yaml").is_file()


def test_export_to_a_format_that_cannot_hold_the_model(tmp_path, llama_dir, capsys):
    import_checkpoint("llama", llama_dir, tmp_path / "ckpt", core="1-2")
    line = cli_error(capsys, ["export", "--to", "huginn", str(tmp_path / "ckpt"), "--out", str(tmp_path / "h")])
    assert "cannot be written as huginn_raven" in line and "norm_placement must be sandwich" in line
    assert not (tmp_path / "h").exists()


def test_bad_depth_scaling_json(tmp_path, llama_dir):
    import_checkpoint("llama", llama_dir, tmp_path / "ckpt", core="1-2")
    (tmp_path / "ckpt" / "depth_scaling.json").write_text(json.dumps({"depths": [1, 2], "loss": [1.0]}))
    with pytest.raises(UserError, match="depth_scaling.json: 'loss' must be a list with one value per depth"):
        export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tampered_converted_checkpoint(tmp_path, llama_dir):
    import_checkpoint("llama", llama_dir, tmp_path / "ckpt", core="1-2")
    w = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    w["core.0.attn.qkv_proj.weight"] = torch.zeros(2, 2)
    save_file(w, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.safetensors: tensor core\.0\.attn\.qkv_proj\.weight has shape"):
        export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "out")


@pytest.mark.parametrize("key,value", [("hidden_size", 64), ("vocab_size", 7), ("num_hidden_layers", 99),
                                       ("tie_word_embeddings", "flip")])
def test_hf_config_whose_top_level_disagrees_with_its_stars_scale_section(tmp_path, llama_dir, capsys, key, value):
    import_checkpoint("llama", llama_dir, tmp_path / "ckpt", core="1-2")
    export_checkpoint(tmp_path / "ckpt", "hf", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    value = (not cfg[key]) if value == "flip" else value
    cfg[key] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    line = cli_error(capsys, ["import", "--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert "config.json" in line and f"{key} is {value!r}" in line and "disagree" in line
    assert not (tmp_path / "out").exists()
