import sys

from sparsebench.cli.main import main

sys.exit(main())
