import sys

from kcache.cli import main

sys.exit(main())
