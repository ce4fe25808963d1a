"""`python -m data_tools ...` is `mmtrain data ...`."""

import sys

from data_tools.cli import main

sys.exit(main(sys.argv[1:]))
