"""5-minute demo script (the user's), now `multicloud demo`: see src/multicloud/demo.py.

    python scripts/run_demo_pipeline.py                  # embedded cluster
    python scripts/run_demo_pipeline.py --cluster-mode   # registry + node processes
"""

from __future__ import annotations

import sys

from multicloud.ui.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
