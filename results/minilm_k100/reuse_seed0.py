"""Copy the grid's finished STS-B seed-0 runs into the STS-B sweep folder of the same learning rate.

Such a run is exactly the sweep's run at that rate (same command but for the folder), so it is not
trained twice; the runner checks the recorded arguments and would refuse a copy that differs.
"""

import json
import shutil
import sys
from pathlib import Path

root = Path(sys.argv[1])
for x in (1, 3, 10, 30):
    rates = json.loads((root / f"sweep_stsb_lr_x{x}.json").read_text())
    for src in sorted((root / "grid/stsb/k100").glob("*/seed0/metrics.json")):
        rec = json.loads(src.read_text())
        dst = root / f"sweep_stsb/lr_x{x}/stsb/k100/{rec['method']}/seed0"
        if rec.get("status") == "done" and rates.get(rec["method"], "-").split() == rec["command"][-2:]:
            if not (dst / "metrics.json").exists():
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
                print(f"reused {src.parent} as {dst}")
