"""shared.checkpoint: round trips (torch, numpy, tied), crash safety, strict shape checks, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from shared import checkpoint as K
from shared.config import ModelConfig

TIED = ModelConfig(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, max_seq_len=8, multiple_of=8)
UNTIED = TIED.replace(tie_embeddings=False)


def random_model(config: ModelConfig, seed: int = 0, *, framework: str = "pt") -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {k: torch.randn(shape, generator=g) for k, shape in K.expected_shapes(config).items()}
    return {k: v.numpy() for k, v in model.items()} if framework == "np" else model


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_expected_shapes_gqa_and_tying():
    shapes = K.expected_shapes(UNTIED)
    hd = 16 // 4
    assert shapes["layers.1.attention.wq.weight"] == (4 * hd, 16)
    assert shapes["layers.1.attention.wk.weight"] == shapes["layers.1.attention.wv.weight"] == (2 * hd, 16)
    assert shapes["layers.0.attention.wo.weight"] == (16, 4 * hd)
    assert shapes["layers.0.feed_forward.w2.weight"] == (16, UNTIED.hidden_dim)
    assert shapes["output.weight"] == shapes["tok_embeddings.weight"] == (40, 16)
    assert len(shapes) == 1 + 2 * 9 + 1 + 1
    assert "output.weight" not in K.expected_shapes(TIED)
    assert sum(np.prod(s) for s in shapes.values()) == UNTIED.num_params()


def test_torch_round_trip_with_everything(tmp_path):
    model = random_model(UNTIED)
    model["layers.0.attention.wq.weight"] = model["layers.0.attention.wq.weight"].to(torch.bfloat16)
    optimizer = {"step": torch.tensor(3.0), "exp_avg.norm.weight": torch.randn(16)}
    state = {"step": 3, "sampler": {"bit_generator": {"state": {"state": 2**100}}}}
    path = K.save_checkpoint(tmp_path / "ck", model, UNTIED, tokenizer={"merges": [[1, 2]]},
                             train_state=state, optimizer=optimizer)
    ck = K.load_checkpoint(path)
    assert ck.config == UNTIED and ck.tokenizer == {"merges": [[1, 2]]} and ck.train_state == state
    assert ck.model["layers.0.attention.wq.weight"].dtype == torch.bfloat16
    for k in model:
        assert torch.equal(ck.model[k], model[k]), k
    assert all(torch.equal(ck.optimizer[k], optimizer[k]) for k in optimizer)
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "model.safetensors",
                                                      "optimizer.safetensors"]


def test_numpy_round_trip_and_cross_framework(tmp_path):
    model = random_model(UNTIED, framework="np")
    K.save_checkpoint(tmp_path / "ck", model, UNTIED)
    ck = K.load_checkpoint(tmp_path / "ck", framework="np")
    assert all(isinstance(v, np.ndarray) for v in ck.model.values())
    assert_same(ck.model, model)
    assert ck.optimizer is None and ck.tokenizer is None and ck.train_state is None
    assert_same(K.load_checkpoint(tmp_path / "ck", framework="pt").model, model)


def test_tied_embeddings_stored_once(tmp_path):
    model = random_model(TIED)
    model["output.weight"] = model["tok_embeddings.weight"]  # the same tensor, as in a tied nn.Module
    model["layers.0.ffn_norm.weight"] = model["layers.0.attention_norm.weight"][:]  # a shared-storage view
    K.save_checkpoint(tmp_path / "ck", model, TIED)
    ck = K.load_checkpoint(tmp_path / "ck")
    assert "output.weight" not in ck.model
    assert torch.equal(ck.model["tok_embeddings.weight"], model["output.weight"])
    model["output.weight"] = model["tok_embeddings.weight"] + 1
    with pytest.raises(K.CheckpointError, match="output.weight differs"):
        K.save_checkpoint(tmp_path / "ck2", model, TIED)


@pytest.mark.parametrize("crash_at", ["before_rename", "after_moving_old", "before_cleanup"])
def test_crash_mid_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, crash_at):
    path = tmp_path / "ck"
    old_model, new_model = random_model(TIED, 1), random_model(TIED, 2)
    K.save_checkpoint(path, old_model, TIED, train_state={"step": 1})

    real_replace, real_rmtree, calls = os.replace, shutil.rmtree, []

    def replace(src, dst):
        calls.append(dst)
        if crash_at == "before_rename" or (crash_at == "after_moving_old" and len(calls) == 2):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    def rmtree(p, *args, **kwargs):
        if crash_at == "before_cleanup" and str(p).endswith(".old") and os.path.isdir(p):
            raise KeyboardInterrupt("simulated crash")
        return real_rmtree(p, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        K.save_checkpoint(path, new_model, TIED, train_state={"step": 2})
    monkeypatch.undo()

    if crash_at == "before_cleanup":  # the new checkpoint was already in place
        ck = K.load_checkpoint(path)
        assert ck.train_state == {"step": 2}
        assert_same(ck.model, new_model)
        return
    if crash_at == "after_moving_old":
        assert not path.exists() and (tmp_path / "ck.old").is_dir()
        with pytest.warns(UserWarning, match="interrupted save"):
            ck = K.load_checkpoint(path)
    else:
        ck = K.load_checkpoint(path)
    assert ck.train_state == {"step": 1}
    assert_same(ck.model, old_model)
    # The next save succeeds and leaves exactly one checkpoint behind.
    K.save_checkpoint(path, new_model, TIED, train_state={"step": 3})
    assert K.load_checkpoint(path).train_state == {"step": 3} and not (tmp_path / "ck.old").exists()


def test_check_state_dict_names_every_problem():
    expected = K.expected_shapes(TIED)
    model = random_model(TIED)
    K.check_state_dict(expected, model)
    del model["layers.1.ffn_norm.weight"]
    model["layers.0.attention.wk.weight"] = torch.zeros(16, 16)
    model["rope.freqs"] = torch.zeros(4)
    with pytest.raises(K.CheckpointError) as err:
        K.check_state_dict(expected, model)
    msg = str(err.value)
    assert "missing: layers.1.ffn_norm.weight (16,)" in msg
    assert "unexpected: rope.freqs (4,)" in msg
    assert "wrong shape: layers.0.attention.wk.weight expected (8, 16), got (16, 16)" in msg


def test_save_refuses_a_model_that_does_not_match_its_config(tmp_path):
    with pytest.raises(K.CheckpointError, match="missing: output.weight"):
        K.save_checkpoint(tmp_path / "ck", random_model(TIED), UNTIED)
    assert not (tmp_path / "ck").exists()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "log.txt").write_text("precious")
    with pytest.raises(K.CheckpointError, match="not a checkpoint"):
        K.save_checkpoint(tmp_path / "runs", random_model(TIED), TIED)
    assert (tmp_path / "runs" / "log.txt").read_text() == "precious"


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(K.CheckpointError, match="nowhere"):
        K.load_checkpoint(tmp_path / "nowhere")
    path = K.save_checkpoint(tmp_path / "ck", random_model(TIED), TIED)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(K.CheckpointError, match=r"ck/checkpoint.json is not valid JSON"):
        K.load_checkpoint(path)
    (path / "checkpoint.json").write_text(json.dumps({"format": 1, "config": TIED.to_dict()}))
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(K.CheckpointError, match="model.safetensors"):
        K.load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(K.CheckpointError, match="model.safetensors is missing"):
        K.load_checkpoint(path)
    # Weights that do not fit the config in checkpoint.json.
    K.save_checkpoint(path, random_model(TIED), TIED)
    (path / "checkpoint.json").write_text(json.dumps({"format": 1, "config": UNTIED.to_dict()}))
    with pytest.raises(K.CheckpointError, match="missing: output.weight"):
        K.load_checkpoint(path)
    with pytest.raises(ValueError, match="framework"):
        K.load_checkpoint(path, framework="jax")
