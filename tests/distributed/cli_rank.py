"""One rank of a hand-launched CLI job (the tests set torchrun's environment variables themselves).

``QUARK_TEST_DIE_RANK=R`` makes rank R exit (status 3) when the observers' statistics are about to be
reduced, i.e. in the middle of the run.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    if os.environ.get("QUARK_TEST_DIE_RANK") == os.environ.get("RANK"):
        from quark.torch.quantization.calibration import distributed

        def _die(*args: object, **kwargs: object) -> None:
            os._exit(3)

        distributed.reduce_observers = _die  # type: ignore[assignment]
    from quark.torch.llm.cli import main

    raise SystemExit(main(sys.argv[1:]))
