import sys

from scion.cli.main import main

sys.exit(main())
