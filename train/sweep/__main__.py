import sys

from moe_playground.train.sweep.cli import main

sys.exit(main())
