"""``python -m kdexp.report SOURCE... [options]`` (same as ``kdexp report``)."""

import sys

from kdexp.report.cli import main

sys.exit(main(sys.argv[1:]))
