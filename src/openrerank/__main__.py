import sys

from openrerank.cli.main import main

sys.exit(main())
