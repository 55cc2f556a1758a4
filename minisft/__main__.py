import sys

from minisft.cli import main

sys.exit(main())
