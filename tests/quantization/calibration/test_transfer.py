"""Page-locked transfers between the CPU and a GPU, and where the runner keeps activations."""

from __future__ import annotations

import types

import pytest
import torch

from quark.torch.quantization.calibration import layerwise, transfer
from quark.torch.quantization.calibration.layerwise import CapturedInputs

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run through the device tool)")


def test_transfer_is_tensor_to_without_a_gpu() -> None:
    t = torch.randn(1 << 19)  # 2 MiB
    assert transfer.transfer(t, "cpu") is t
    moved = transfer.transfer(t, "meta")
    assert moved.device.type == "meta" and moved.shape == t.shape


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_copies_equal_plain_copies(dtype: torch.dtype) -> None:
    host = torch.randn(3, 1 << 19).to(dtype)
    device = transfer.transfer(host, "cuda")
    assert device.is_cuda and torch.equal(device.cpu(), host)
    back = transfer.transfer(device, "cpu")
    assert not back.is_pinned() and torch.equal(back, host)
    pinned = transfer.transfer(device, "cpu", keep_pinned=True)
    assert pinned.is_pinned() and torch.equal(pinned, host)
    strided = host.t()  # not contiguous: a plain copy keeps its strides
    assert torch.equal(transfer.transfer(strided, "cuda").cpu(), strided)


@pytest.mark.gpu
@gpu
def test_released_staging_memory_leaves_the_process() -> None:
    """Page-locked blocks no tensor holds go back to the system (PyTorch's host allocator keeps them otherwise)."""
    device = torch.randn(1 << 24, device="cuda")  # 64 MiB
    staged = transfer.transfer(device, "cpu", keep_pinned=True)
    assert staged.is_pinned()
    held = transfer._pinned_in_use()
    assert held >= 1 << 26
    del staged
    assert transfer._pinned_in_use() == held  # freed, but cached by the allocator
    transfer.release_pinned_cache()
    assert transfer._pinned_in_use() <= held - (1 << 26)


@pytest.mark.gpu
@gpu
def test_copies_to_cpu_memory_and_files_stage_through_two_small_buffers(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path) -> None:
    """A copy from the GPU into ordinary memory or a file crosses in pieces of STAGE_BYTES through two page-locked
    buffers (a partial last piece included): the same bytes, and no more page-locked memory than the buffers."""
    from safetensors import safe_open

    from quark.torch.quantization.calibration.safetensors_header import save_streamed

    monkeypatch.setattr(transfer, "STAGE_BYTES", 1 << 20)
    transfer.release_pinned_cache()
    before = transfer._pinned_in_use()
    device = torch.randn(5 * (1 << 18) + 3, device="cuda").to(torch.bfloat16)  # 2.5 MiB + 6 bytes: 3 pieces
    expected = device.cpu()
    gathered = bytearray()
    for start, piece in transfer.host_pieces(device):
        assert start == len(gathered) and piece.is_pinned() and piece.numel() <= 1 << 20
        gathered += piece.numpy().tobytes()
    del piece  # a view of one of the two buffers: it would keep that buffer from the allocator's cache
    assert bytes(gathered) == expected.view(torch.uint8).numpy().tobytes()
    back = transfer.transfer(device, "cpu")
    assert not back.is_pinned() and torch.equal(back, expected)
    tensors = {"w": device, "small": device[:7], "t": device[:4096].reshape(64, 64).t()}
    save_streamed(tensors, tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), expected) and torch.equal(f.get_tensor("small"), expected[:7])
        assert torch.equal(f.get_tensor("t"), expected[:4096].reshape(64, 64).t())
    assert transfer._pinned_in_use() - before <= (2 << 20) + (64 << 10)  # two buffers, and two for the small ones


def test_releasing_staging_memory_without_cuda_does_nothing() -> None:
    transfer.release_pinned_cache()  # before CUDA is initialised (or on a CPU build): no error


def _cache(hidden_bytes: int) -> CapturedInputs:
    hidden = torch.zeros(hidden_bytes // 4)
    return CapturedInputs([(hidden,)], [{"mask": None}], {})


def test_activations_stay_on_a_gpu_only_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = types.SimpleNamespace(total_memory=64 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: memory)
    monkeypatch.setattr(layerwise, "ACTIVATIONS_ON_DEVICE_BYTES", 3 * 2**20)
    assert layerwise._activation_home(_cache(2**20), "cpu", streams=3) == "cpu"
    assert layerwise._activation_home(_cache(2**20), "cuda:0", streams=3) == torch.device("cuda:0")
    assert layerwise._activation_home(_cache(2**20), "cuda:0", streams=6) == "cpu"  # with a float-model stream
    memory.total_memory = 8 * 2**20  # a quarter of a small device: 2 MiB
    assert layerwise._activation_home(_cache(2**20), "cuda:0", streams=3) == "cpu"


@pytest.mark.gpu
@gpu
def test_a_prefetched_layer_hands_over_only_what_is_unchanged() -> None:
    from quark.torch.quantization.calibration.placement import LayerMover, onloaded

    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    layer.register_buffer("scale", torch.rand(32))
    layer.register_buffer("zero", torch.zeros(32))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mover = LayerMover("cuda")
    mover.read_ahead(layer)
    layer[0].bias.data = torch.ones(32)  # replaced
    layer.zero = torch.full((32,), 3.0)  # a buffer replaced
    ready = mover.take(layer)
    assert len(ready) == 4  # weight, LayerNorm's weight and bias, scale
    assert all(t.is_cuda for t in ready.values())
    with onloaded(layer, "cuda", weights_change=False, ready=ready):
        state = layer.state_dict()
        assert all(v.is_cuda for v in state.values())
        assert torch.equal(state["0.weight"].cpu(), before["0.weight"])
        assert torch.equal(state["scale"].cpu(), before["scale"])
        assert torch.equal(state["0.bias"].cpu(), torch.ones(32)) and torch.equal(state["zero"].cpu(),
                                                                                   torch.full((32,), 3.0))
        assert state["0.weight"].data_ptr() in {t.data_ptr() for t in ready.values()}  # the prefetched copy
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())
    with onloaded(layer, "cuda", weights_change=True, mover=mover):  # back on the mover's thread
        layer[0].weight.data.mul_(2)
    mover.wait()
    mover.close()
    assert all(t.device.type == "cpu" for t in layer.state_dict().values())
    assert torch.equal(layer[0].weight.data, before["0.weight"] * 2)


@pytest.mark.gpu
@gpu
def test_the_runner_moves_layers_on_a_background_thread_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from quark.torch import LLMTemplate, ModelQuantizer
    from quark.torch.quantization.calibration import placement
    from tests.helpers.tiny_models import tiny_model, token_batches

    taken: list[int] = []
    take = placement.LayerPrefetch.take

    def counted(self):
        ready = take(self)
        taken.append(len(ready))
        return ready

    monkeypatch.setattr(placement.LayerPrefetch, "take", counted)
    base = tiny_model("llama")
    batches = token_batches(4, seq=32)
    states = []
    for prefetch in (True, False):
        monkeypatch.setattr(placement, "OVERLAP_LAYER_COPIES", prefetch)
        model = copy.deepcopy(base)
        quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="awq"),
                                   compute_device="cuda")
        quantizer.quantize_model(model, batches)
        quantizer.freeze(model)
        states.append(model.state_dict())
        assert all(t.device.type == "cpu" for t in states[-1].values())
    assert taken and all(n > 0 for n in taken)  # layer 1 of the AWQ pass (at least) came prefetched
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_the_hidden_states_size_is_known_before_the_capture_for_token_batches() -> None:
    from tests.helpers.tiny_models import tiny_model

    model = tiny_model("llama")
    hidden = model.config.hidden_size
    ids = torch.randint(0, 100, (1, 16))
    size = 4 * 16 * hidden
    assert layerwise.hidden_state_bytes(model, [ids, ids[0], {"input_ids": ids}, (ids,)]) == 4 * size
    assert layerwise.hidden_state_bytes(model.to(torch.bfloat16), [ids]) == size // 2
    assert layerwise.hidden_state_bytes(model, [{"inputs_embeds": torch.zeros(1, 16, hidden)}]) is None
    assert layerwise.hidden_state_bytes(torch.nn.Linear(4, 4), [ids]) is None
    assert layerwise._capture_home(model, [ids], "cpu", 3) == "cpu"


@pytest.mark.gpu
@gpu
def test_inputs_that_fit_are_captured_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from quark.torch import LLMTemplate, ModelQuantizer
    from tests.helpers.tiny_models import tiny_model, token_batches

    homes: list[object] = []
    capture = layerwise.capture_decoder_inputs

    def spy(model, batches, layers, offload="cpu", device=None):
        homes.append(torch.device(offload))
        return capture(model, batches, layers, offload, device)

    monkeypatch.setattr(layerwise, "capture_decoder_inputs", spy)
    model = tiny_model("llama")
    ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="gptq"),
                   compute_device="cuda").quantize_model(model, token_batches(4, seq=32))
    assert homes and all(h.type == "cuda" for h in homes)
