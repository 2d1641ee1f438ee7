"""`python -m lora_lab_job run job.json [options]` and `python -m lora_lab_job check job.json`."""
from __future__ import annotations

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
