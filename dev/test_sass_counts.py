"""dev/sass_counts.py: the depthwise kernels compiled for sm_90 (no GPU). The row-streaming
kernels exist to load each input row once per column shift (three loads per output, one of
them 16 bytes wide for four outputs) where the tile kernels they replaced loaded all nine taps
(forward: 7.4 load instructions per output on its cheapest tiles, 36 instructions per output;
weight gradient: 13.75 and 142.5)."""
import subprocess
import sys
from pathlib import Path


def test_row_streaming_kernels_load_each_row_once_per_shift():
    # Its own process: the compiler needs TRITON_INTERPRET unset before the kernels are imported.
    script = Path(__file__).with_name("sass_counts.py")
    result = subprocess.run([sys.executable, str(script), "--size", "512x512"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {line[:16].strip(): (float(line.split(" per output")[0].split()[-1]),
                                  float(line.split(" loads per output")[0].split()[-1]))
              for line in result.stdout.splitlines() if " loads per output" in line}
    instructions, loads = counts["forward"]
    assert loads <= 2.5 and instructions < 30, counts  # 2.25: 1/4 + 2 scalar loads per output
    instructions, loads = counts["gate"]
    assert loads <= 5.0 and instructions < 92.5, counts  # two planes per output
    instructions, loads = counts["weight gradient"]
    assert loads <= 3.0 and instructions < 50, counts  # dout too: 2.5
