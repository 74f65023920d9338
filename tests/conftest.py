import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# The test models are tiny: one thread is fastest, and leaves the other core to parallel work.
torch.set_num_threads(1)


@pytest.fixture
def one_and_two_processes(tmp_path):
    """train_one_and_two(args, batch_size, port): the trainer run once as one process with batch_size and
    once as two DDP processes (torchrun) with half of it each, in tmp_path/one and tmp_path/two."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def run(args: list[str], batch_size: int, port: int) -> None:
        for name, launch, batch in (("one", [], batch_size),
                                    ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)],
                                     batch_size // 2)):
            done = subprocess.run([sys.executable, *launch, "-m", "train.lm", *args, f"out_dir={tmp_path / name}",
                                   f"train.batch_size={batch}"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
    return run
