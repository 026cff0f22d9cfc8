"""The dvc.yaml stages, one module each, same word as the stage and its params.yaml key.

Each module's ``main()`` reads params.yaml, calls the core library and writes under ``pipeline/``;
run them through ``dvc repro`` (or ``python -m transpeft.stages.<stage>`` from the project root).
"""

from pathlib import Path

PIPELINE = Path("pipeline")
DATA = PIPELINE / "data"
BASES = PIPELINE / "bases"
ADAPTERS = PIPELINE / "adapters"
METRICS = PIPELINE / "metrics"
REPORT = PIPELINE / "report"
