import sys

from erde.cli.main import main

sys.exit(main())
