"""``python -m quark.torch.llm``: the same as ``quark-quantize``."""

from quark.torch.llm.cli import main

raise SystemExit(main())
