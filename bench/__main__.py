"""`make bench` = `.venv/bin/python -m bench`: see bench/runner.py for the method."""

import sys

from bench.runner import main

sys.exit(main())
