"""What the flow-run process's memory is: Python objects (tracemalloc) against its resident set.

    python bench/bench_fleet_memory.py 100      # one fleet of 100 on threads; about 20 min (tracemalloc is slow)

Runs bench_fleet.py's threads arm with the flow run under tracemalloc and writes the top allocation
sites, the traced total and the resident set to bench/results/fleet_memory.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_fleet  # noqa: E402

REPORT = Path(__file__).parent / "results" / "fleet_memory.txt"

bench_fleet.FLOW = f"""
import gc, json, sys, tracemalloc
tracemalloc.start(8)
import psutil
from flows.transfer_on_base_update import transfer_on_base_update
state = transfer_on_base_update(family=sys.argv[1], version=sys.argv[2], data_dir=sys.argv[3],
                                params_file=sys.argv[4], return_state=True)
gc.collect()
snapshot = tracemalloc.take_snapshot()
with open({str(REPORT)!r}, "w") as out:
    print("resident MiB", round(psutil.Process().memory_info().rss / 2**20),
          "traced Python objects MiB", round(tracemalloc.get_traced_memory()[0] / 2**20), file=out)
    for stat in snapshot.statistics("filename")[:25]:
        print(stat, file=out)
print("RESULT " + json.dumps({{"flow_run_id": str(state.state_details.flow_run_id), "summary": state.result()}}))
"""

if __name__ == "__main__":
    size = sys.argv[1] if len(sys.argv) > 1 else "100"
    sys.argv = [sys.argv[0], "--sizes", size, "--runners", "threads", "--out",
                str(REPORT.with_name("fleet_memory.json"))]
    bench_fleet.main()
