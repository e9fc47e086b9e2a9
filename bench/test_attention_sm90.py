"""bench/attention_sm90.py: the MDTA stream plans compiled for sm_90 (no GPU). No tensor-core
product is serialised by ptxas, and the 16-bit plans of prefetch depth 2 keep twice the loads
of depth 1 in flight per multiprocessor where depth 1 runs one program per multiprocessor (what
depth 2 is for), and no fewer where two programs of depth 1 share one (the mix passes at 48
channels, and the single mix at 96 in bfloat16, whose rows of M are no longer scaled in
registers)."""
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
    in_flight, programs = {}, {}
    for line in rows:
        name, width, dtype, depth = re.match(r"MDTA (\w+) +c= *(\d+) (\w+) depth (\d)", line).groups()
        key = (name, int(width), dtype, int(depth))
        in_flight[key] = float(re.search(r"(\d+) KB of loads in flight", line).group(1))
        programs[key] = int(re.search(r"\((\d+) program\(s\)\)", line).group(1))
    deeper = [key for key in in_flight if key[3] == 2]
    assert {(name, width) for name, width, _, _ in deeper} == {
        ("gram", 48), ("gram", 96), ("gram", 176), ("mix1", 48), ("mix2", 48), ("mix1", 96), ("mix2", 96)}
    for name, width, dtype, _ in deeper:
        shallow = (name, width, dtype, 1)
        factor = 2 if programs[shallow] == 1 else 1
        assert in_flight[name, width, dtype, 2] >= factor * in_flight[shallow] - 1, (name, width, in_flight)
