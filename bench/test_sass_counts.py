"""bench/sass_counts.py: the depthwise kernels compiled for sm_90 (no GPU); the interior tile
path must stay cheaper to issue than the masked edge path it exists to avoid."""
import subprocess
import sys
from pathlib import Path


def test_interior_tiles_issue_fewer_instructions_than_edge_tiles():
    # Its own process: the compiler needs TRITON_INTERPRET unset before the kernels are imported.
    script = Path(__file__).with_name("sass_counts.py")
    result = subprocess.run([sys.executable, str(script), "--size", "512x512"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_output = {line[:24].strip(): float(line.split(" per output")[0].split()[-1])
                  for line in result.stdout.splitlines() if " per output" in line}
    assert per_output["forward, interior path"] < 0.8 * per_output["forward, edge path"], per_output
    assert per_output["gate, interior path"] < 0.8 * per_output["gate, edge path"], per_output
