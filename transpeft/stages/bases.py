"""Stage bases: build the demo family into pipeline/bases, or record the configured real bases.

With ``bases.sources`` set (version -> directory or ``hub-id@revision``), nothing is built: the
stage writes pipeline/bases/sources.json and the other stages load those bases directly.
"""

from __future__ import annotations

import json
import sys

from ..demo.family import build_demo_family
from ..params import load_params
from . import BASES


def main() -> int:
    params = load_params().bases
    BASES.mkdir(parents=True, exist_ok=True)
    if params.is_demo:
        family = build_demo_family(BASES, profile=params.profile, name=params.family)
        print(f"built the demo family ({params.profile}) in {BASES}: drift {family['drift']}")
    else:
        missing = [v for v in params.versions if v not in params.sources]
        if missing:
            print(f"params.yaml: bases.sources has no entry for {', '.join(missing)}", file=sys.stderr)
            return 1
        (BASES / "sources.json").write_text(json.dumps(params.sources, indent=2) + "\n")
        print(f"using configured bases: {params.sources}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
