"""The dvc.yaml stages, one module each, same word as the stage and its params.yaml key.

Each module's ``main()`` reads params.yaml, calls the core library and writes under ``pipeline/``;
run them through ``dvc repro`` (or ``python -m transpeft.stages.<stage>`` from the project root).
"""

from ..params import ADAPTERS, BASES, DATA, METRICS, PIPELINE, REPORT  # noqa: F401 - the stages' outputs
