#!/usr/bin/env python3
"""Find the real largest batch that does not run out of memory, beside the planner's answer:
`python -m cpugen probe` (cpugen/perf/probe.py), as a script.

    python scripts/probe_batch.py --model gptj-1b --layers 2 --prompt-len 64 --gen-len 1984 --memory-limit 3GiB
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
