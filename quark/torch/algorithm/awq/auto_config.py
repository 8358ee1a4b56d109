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

from quark.torch.algorithm.utils.model_info import discover_scaling_groups

logger = logging.getLogger(__name__)


def awq_auto_config_helper(model: nn.Module) -> dict[str, Any]:
    """The AWQ config of ``model`` found from one hooked forward of its first decoder layer."""
    path, groups = discover_scaling_groups(model)
    partial = [g.layers for g in groups if g.only_where_present]
    if partial:
        logger.warning("scaling groups %s exist in some decoder layers only; as scaling_layers entries each needs a "
                       "condition that holds in those layers only", partial)
    layers = model.get_submodule(path)
    inside = {id(m) for m in layers.modules()}
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and id(m) not in inside]
    return {
        "name": "awq",
        "scaling_layers": [g.to_dict() for g in groups],
        "model_decoder_layers": path,
        "embedding_layers": embeddings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="local transformers checkpoint directory")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    model.eval()
    json.dump(awq_auto_config_helper(model), __import__("sys").stdout, indent=2)
    __import__("sys").stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
