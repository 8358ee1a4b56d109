"""The layerwise runner: unquantized replay reproduces the full model; errors restore weights."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_batches, make_model
from torch import nn

from quark.torch.quantization.calibration.batches import model_inputs
from quark.torch.quantization.calibration.layerwise import (
    ModelBackup,
    find_decoder_layers,
    forward_until_seen,
    run_layerwise,
)


class _Recorder:
    """A step that changes nothing and records the last layer's outputs."""

    def __init__(self) -> None:
        self.calls = 0

    def targets(self, layer, index):
        return {}

    def collect(self, name, module, args, kwargs, output):
        self.calls += 1

    def apply(self, layer, index, inputs):
        self.last = [layer(*a, **k) for a, k in inputs]


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_replay_reproduces_full_model(family):
    model = make_model(family)
    batches = make_batches(2)
    step = _Recorder()
    run_layerwise(model, batches, [step], "cpu")
    # Final norm + head on the last layer's replayed outputs equals the full forward's logits.
    # The runner hands the step the batches merged (batching.py): compare all tokens at once.
    with torch.no_grad():
        hidden = torch.cat([h[0] if isinstance(h, tuple) else h for h in step.last], 0)
        assert hidden.shape[0] == len(batches)
        ref = torch.cat([model(batch, use_cache=False).logits for batch in batches], 0)
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        norm = getattr(base, "norm", None) or base.final_layer_norm
        logits = model.get_output_embeddings()(norm(hidden))
        assert torch.allclose(logits, ref, atol=1e-5, rtol=1e-5)


def test_batch_formats_and_bad_batch():
    ids = torch.ones(1, 4, dtype=torch.long)
    cpu = torch.device("cpu")
    assert model_inputs(ids, cpu)[0][0] is ids
    assert model_inputs({"input_ids": ids}, cpu)[1]["input_ids"] is ids
    assert model_inputs([ids, "x"], cpu)[0][0] is ids
    assert model_inputs(ids[0], cpu)[0][0].shape == (1, 4)  # 1-D ids get a batch dimension
    with pytest.raises(ValueError, match="batch 3 has type str"):
        model_inputs("text", cpu, 3)


def test_decoder_path_errors():
    model = make_model("llama")
    assert find_decoder_layers(model)[0] == "model.layers"
    with pytest.raises(ValueError, match="names no module"):
        find_decoder_layers(model, "model.blocks")
    with pytest.raises(ValueError, match=r"not an nn\.ModuleList"):
        find_decoder_layers(model, "model.norm")


class _Breaker:
    """Scales every weight of each layer, and makes layer 1 produce NaN."""

    def targets(self, layer, index):
        return {}

    def collect(self, *a):
        pass

    def apply(self, layer, index, inputs):
        for p in layer.parameters():
            p.data.mul_(2.0)
        if index == 1:
            next(p for p in layer.parameters() if p.dim() == 2).data.fill_(float("nan"))


def test_nan_stops_with_layer_name_and_restores_weights():
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"model\.layers\.1"):
        run_layerwise(model, make_batches(1), [_Breaker()], "cpu", backup=ModelBackup())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not hasattr(m, "_forward_hooks") or not m._forward_hooks for m in model.modules()
               if isinstance(m, nn.Linear))


def test_backup_goes_to_disk_and_restores(tmp_path, monkeypatch):
    """The backup holds no copy in memory after the write; restore reads it back; close deletes it."""
    monkeypatch.setattr("quark.torch.quantization.calibration.layerwise.BACKUP_PIECE_BYTES", 1024)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backup = ModelBackup(folder=tmp_path)
    backup.save(model)
    backup._flush()
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(files) > 1  # pieces of about BACKUP_PIECE_BYTES
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    backup.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(tmp_path.iterdir())


def test_backup_without_a_copy_keeps_the_tensors_it_was_given(tmp_path):
    """``save(copy=False)`` writes the module's CPU tensors as they are: a module whose parameters get new
    tensors afterwards (as ``onloaded`` gives them on the compute device) is restored to the saved values."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backup = ModelBackup(folder=tmp_path)
    backup.save(model, copy=False)
    for p in model.parameters():
        p.data = torch.full_like(p.data, 7.0)  # new tensors, as a move to another device makes
    backup.restore()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_backup_close_deletes_its_folder(tmp_path):
    backup = ModelBackup(folder=tmp_path)
    backup.save(torch.nn.Linear(4, 4))
    assert any(tmp_path.iterdir())
    backup.close()
    assert not any(tmp_path.iterdir())
    backup.restore()  # nothing saved any more: a no-op


def test_a_discarded_backup_deletes_its_folder_in_the_background(tmp_path, monkeypatch):
    """After a successful run the copies are dropped without waiting: queued writes are cancelled, the folder goes
    once the running write ends, and nothing can be restored any more."""
    import threading

    monkeypatch.setattr("quark.torch.quantization.calibration.layerwise.BACKUP_PIECE_BYTES", 1024)
    backup = ModelBackup(folder=tmp_path)
    backup.save(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)))
    assert any(tmp_path.iterdir())
    backup.discard()
    for thread in threading.enumerate():
        if thread.name == "quark-backup-cleanup":
            thread.join(timeout=30)
    assert not any(tmp_path.iterdir())
    model = torch.nn.Linear(4, 4)
    weight = model.weight.detach().clone()
    backup.restore()  # nothing saved any more: a no-op
    assert torch.equal(model.weight, weight)


class _TargetsOnly(_Recorder):
    """Records q/k/v only and lets the runner stop each call after them."""

    collects_targets_only = True

    def targets(self, layer, index):
        return {n: layer.get_submodule(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")}


def test_a_targets_only_pass_stops_after_its_targets():
    model = make_model("llama")
    ran: list[str] = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(lambda *a, _i=i: ran.append(f"down{_i}"))
        layer.self_attn.o_proj.register_forward_hook(lambda *a, _i=i: ran.append(f"o{_i}"))
    step = _TargetsOnly()
    run_layerwise(model, make_batches(2), [step], "cpu")
    assert step.calls == 3 * 2 * len(model.model.layers)  # q, k, v of every batch in every layer
    # o_proj and down_proj ran only in the propagating pass (apply's and the outputs'), not in the collecting pass
    with_full = _Recorder()
    ran_full_before = len(ran)
    run_layerwise(model, make_batches(2), [with_full], "cpu")
    assert len(ran) - ran_full_before > ran_full_before


def test_forward_until_seen_lets_a_call_finish_when_a_target_does_not_run():
    model = make_model("llama")
    layer = model.model.layers[0]
    outside = nn.Linear(4, 4)  # never called by the layer
    ran: list[int] = []
    layer.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))
    hidden = torch.randn(1, 5, model.config.hidden_size)
    position = model.model.rotary_emb(hidden, torch.arange(5)[None])
    call = ((hidden,), {"position_embeddings": position})
    forward_until_seen(layer, [call], [layer.self_attn.q_proj])
    assert ran == []
    forward_until_seen(layer, [call], [layer.self_attn.q_proj, outside])
    assert ran == [1]
