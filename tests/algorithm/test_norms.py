"""Norm gains (``weight`` or ``1 + weight``): the scaling and folding transforms keep the float model.

SmoothQuant and AWQ divide a norm's gain by ``s`` and multiply the next linears' columns by ``s``;
rotation folds the gain into those linears. Both are exact rewrites of the float model, checked
here on the logits of families whose norms are written each way (Gemma's RMSNorm multiplies by
``1 + weight``: treating the weight as the gain had silently changed Gemma models).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers
from torch import nn

from quark.torch.algorithm.utils.model_info import _norm_like, discover_scaling_groups
from quark.torch.algorithm.utils.norms import gain_offset
from quark.torch.algorithm.utils.scaling import fold_norm_into_fcs, scale_norm_fcs

GQA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=256, max_position_embeddings=128)
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**GQA), 0.0),
    "gemma": (lambda: transformers.GemmaConfig(**GQA, head_dim=16), 1.0),
    "gemma2": (lambda: transformers.Gemma2Config(**GQA, head_dim=16), 1.0),
    "qwen3": (lambda: transformers.Qwen3Config(**GQA, head_dim=16), 0.0),
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(**GQA, head_dim=16), 1.0),
    "cohere": (lambda: transformers.CohereConfig(**GQA), 0.0),
    "opt": (lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64), 0.0),
}
BATCH = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval()
    with torch.no_grad():  # gains away from their initial 1 (or 0), biases away from 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model


def _norm_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    path, groups = discover_scaling_groups(model, [BATCH])
    layer = model.get_submodule(path)[0]
    found = [(layer.get_submodule(g.prev_op), [layer.get_submodule(n) for n in g.layers]) for g in groups]
    return [(norm, fcs) for norm, fcs in found if _norm_like(norm)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_gain_offset_of_each_family_norm(family):
    model = _model(family)
    groups = _norm_groups(model)
    assert groups, "no norm feeds a linear"
    before = {id(norm): norm.weight.clone() for norm, _ in groups}
    for norm, _ in groups:
        assert gain_offset(norm) == FAMILIES[family][1], type(norm).__name__
        assert torch.equal(norm.weight, before[id(norm)])  # probed, then put back


def _assert_keeps_the_logits(family: str, rewrite: Callable[[nn.Module, list[nn.Linear]], None]) -> None:
    """``rewrite(norm, readers)`` applied to every norm group of layer 0 leaves the model's logits."""
    model = _model(family)
    with torch.no_grad():
        expected = model(BATCH).logits
        for norm, fcs in _norm_groups(model):
            rewrite(norm, fcs)
        got = model(BATCH).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaling_a_norm_keeps_the_float_model(family):
    def scale(norm: nn.Module, fcs: list[nn.Linear]) -> None:
        s = torch.rand(norm.weight.numel(), generator=torch.Generator().manual_seed(2)) * 3 + 0.25
        scale_norm_fcs(norm, fcs, s)

    _assert_keeps_the_logits(family, scale)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folding_a_norm_keeps_the_float_model(family):
    def fold(norm: nn.Module, fcs: list[nn.Linear]) -> None:
        fold_norm_into_fcs(norm, fcs)
        assert torch.allclose(norm.weight.double() + gain_offset(norm), torch.ones(1, dtype=torch.float64))

    _assert_keeps_the_logits(family, fold)


def test_a_weight_that_is_not_an_elementwise_gain_is_refused():
    class Squared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight * self.weight

    with pytest.raises(ValueError, match="Squared: its gain is neither its weight nor 1 \\+ its weight"):
        gain_offset(Squared())
