"""`python -m ptr_kernels.benchmark`: the same as `ptr-kernels bench`."""

import sys

from .cli import main

sys.exit(main())
