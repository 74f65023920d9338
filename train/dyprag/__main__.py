import sys

from moe_playground.train.dyprag.pipeline import main

sys.exit(main())
