import sys

from erde.cli import main

sys.exit(main())
