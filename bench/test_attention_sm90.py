"""bench/attention_sm90.py: the MDTA stream plans compiled for sm_90 (no GPU). No tensor-core
product is serialised by ptxas, and the 16-bit plans of prefetch depth 2 keep twice the loads
of depth 1 in flight per multiprocessor (what depth 2 is for; at 64 channels only the Gram
pass has it: two mix programs of depth 1 already share a multiprocessor, as they now do at
128 channels in bfloat16, whose mix rows are no longer scaled in registers: there depth 2 keeps
no fewer)."""
import re
import subprocess
import sys
from pathlib import Path


def test_depth_2_doubles_the_loads_in_flight_without_serialised_products():
    # Its own process: the compiler needs TRITON_INTERPRET unset before the kernels are imported.
    script = Path(__file__).with_name("attention_sm90.py")
    result = subprocess.run([sys.executable, str(script), "--only", "mdta"], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("MDTA ")]
    assert rows and not any("SERIALISED" in line for line in rows), result.stdout
    in_flight = {}
    for line in rows:
        name, width, dtype, depth = re.match(r"MDTA (\w+) +c= *(\d+) (\w+) depth (\d)", line).groups()
        in_flight[name, int(width), dtype, int(depth)] = float(re.search(r"(\d+) KB of loads in flight", line).group(1))
    deeper = [key for key in in_flight if key[3] == 2]
    assert {(name, width) for name, width, _, _ in deeper} == {("gram", 48), ("gram", 96), ("gram", 176), ("mix1", 96)}
    for name, width, dtype, _ in deeper:
        # the mix at 96 channels: bfloat16's unscaled rows let two programs of depth 1 share a
        # multiprocessor, as many loads in flight as one of depth 2
        factor = 1 if name == "mix1" else 2
        assert in_flight[name, width, dtype, 2] >= factor * in_flight[name, width, dtype, 1] - 1, (name, width, in_flight)
