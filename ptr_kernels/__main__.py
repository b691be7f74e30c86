"""`python -m ptr_kernels ...`: the same as the `ptr-kernels` console script."""

import sys

from .cli import main

sys.exit(main())
