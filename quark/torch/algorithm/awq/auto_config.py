"""Discover AWQ / SmoothQuant scaling groups of any decoder-only model, as a config dict.

``awq_auto_config_helper(model)`` returns the ``awq_config.json`` content (``scaling_layers``,
``model_decoder_layers``, ``embedding_layers``); ``python -m quark.torch.algorithm.awq.auto_config
--model_dir DIR`` prints it for a local transformers checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from torch import nn

from quark.torch.algorithm.utils.model_info import ScalingGroup, discover_scaling_groups

logger = logging.getLogger(__name__)


def awq_auto_config_helper(model: nn.Module) -> dict[str, Any]:
    """The AWQ config of ``model`` found from hooked forwards of its decoder layers (one per distinct layer
    structure)."""
    path, groups = discover_scaling_groups(model)
    layers = model.get_submodule(path)
    inside = {id(m) for m in layers.modules()}
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
    return {
        "name": "awq",
        "scaling_layers": [_entry(g) for g in groups],
        "model_decoder_layers": path,
        "embedding_layers": embeddings,
    }


def _entry(group: ScalingGroup) -> dict[str, Any]:
    """A ``scaling_layers`` entry; a group found in some decoder layers only gets a condition that holds where
    its modules exist (``hasattr`` along each module's path)."""
    entry = group.to_dict()
    if not group.only_where_present:
        return entry
    names = [n for n in (group.prev_op, group.inp, group.module2inspect, *group.layers) if n]
    checks: list[str] = []
    for name in names:
        path = "module"
        for part in name.split("."):
            if part.isdigit():  # an item of a ModuleList (an expert): indexed, not looked up by name
                path += f"[{part}]"
                continue
            check = f"hasattr({path}, '{part}')"
            if check not in checks:
                checks.append(check)
            path += f".{part}"
    presence = " and ".join(checks)
    entry["condition"] = f"({entry['condition']}) and {presence}" if entry.get("condition") else presence
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="local transformers checkpoint directory")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    try:
        # safetensors only: a pickled pytorch_model.bin can run code when loaded; the torch forwards, no hub fetch
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, use_safetensors=True, use_kernels=False)
    except (OSError, ValueError) as exc:
        parser.error(f"--model_dir {args.model_dir!r}: cannot load a causal LM from its safetensors weights "
                     f"({str(exc).splitlines()[0]}); pickled .bin weights are never read: convert them to "
                     "safetensors first")
    model.eval()
    json.dump(awq_auto_config_helper(model), __import__("sys").stdout, indent=2)
    __import__("sys").stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
