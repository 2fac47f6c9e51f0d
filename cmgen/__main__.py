import sys

from cmgen.cli import main

sys.exit(main())
