import sys, time, json, torch
import adntn
from pathlib import Path
from adntn.pipeline.compress import compress_to
from adntn.pipeline.options import CompressOptions
t = time.perf_counter()
compress_to(Path("/tmp/adntn-bench/vgg16-random-seed0.pt"), ["fc6", "fc7"], Path(f"/tmp/ab-out-{sys.argv[1]}.adntn"), force=True,
            options=CompressOptions(arch="mera", ratio=float(sys.argv[2])))
print(json.dumps({"which": sys.argv[1], "file": adntn.__file__, "ratio": sys.argv[2], "seconds": round(time.perf_counter() - t, 1),
                  "load": open("/proc/loadavg").read().split()[0]}), flush=True)
