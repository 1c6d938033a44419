"""``python -m kdexp.report SOURCE... [options]`` (same as ``kdexp report``)."""

import sys

from kdexp.core.processes import run_then_exit
from kdexp.report.cli import main

run_then_exit(lambda: main(sys.argv[1:]))
