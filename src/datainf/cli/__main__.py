"""``python -m datainf.cli`` (e.g. under ``torchrun``): the ``datainf`` command line."""

import sys

from datainf.cli import main

sys.exit(main())
