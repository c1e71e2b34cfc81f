import sys

from sparsebench.cli import main

sys.exit(main())
