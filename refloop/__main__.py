import sys

from refloop.cli import main

sys.exit(main())
