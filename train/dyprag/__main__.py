import sys

from train.dyprag.pipeline import main

sys.exit(main())
