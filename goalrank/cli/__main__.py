import sys

from goalrank.cli import main

sys.exit(main())
