import sys

from openrerank.cli import main

sys.exit(main())
