import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# The test models are tiny: one thread is fastest, and leaves the other core to parallel work.
torch.set_num_threads(1)
