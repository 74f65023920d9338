"""One import name: installed with a plain (non-editable) `pip install .`, the playground is `moe_playground`
and a project with its own `models/` imports both; in the checkout the old spelling names the same modules."""

import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    import moe_playground
    on_disk = {"moe_playground"} | {".".join(("moe_playground", *p.parent.relative_to(ROOT).parts))
                                    for part in moe_playground.PARTS for p in (ROOT / part).rglob("__init__.py")}
    assert packages == on_disk


def test_old_spelling_names_the_same_modules():
    import models.moe
    import moe_playground.models.moe
    import moe_playground.train.lm
    from train.lm import LMRunConfig
    assert models.moe is moe_playground.models.moe and models.moe.MoE is moe_playground.models.moe.MoE
    assert LMRunConfig is moe_playground.train.lm.LMRunConfig
    out = subprocess.run([sys.executable, "-m", "train.lm", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "usage: python -m train.lm" in out.stdout


@pytest.mark.slow
def test_non_editable_install_beside_a_users_own_models(tmp_path):
    src, site, project = tmp_path / "src", tmp_path / "site", tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("moe_playground", "models", "train", "benchmarks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(site), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    assert not (site / "models").exists() and not (site / "train").exists(), "old top-level names installed"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("")
    (project / "models" / "mine.py").write_text("WHO = 'the user'\n")
    script = textwrap.dedent(f"""
        import sys, torch
        import models.mine
        import moe_playground
        from moe_playground.models.moe import MoE, MoEConfig
        from moe_playground.train.lm import LMRunConfig, build_model
        assert models.mine.WHO == "the user" and moe_playground.__file__.startswith({str(site)!r})
        assert "train" not in sys.modules and "models.moe" not in sys.modules
        y, aux = MoE(MoEConfig(d_model=16, n_routed_experts=4, expert_hidden=8, top_k=2))(torch.randn(2, 3, 16))
        assert y.shape == (2, 3, 16)
        print("imports ok")
    """)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "imports ok" in run.stdout, run.stderr
    cli = subprocess.run([sys.executable, "-m", "moe_playground.train.lm", "--help"], cwd=project, capture_output=True,
                         text=True, env=env)
    assert cli.returncode == 0 and "config" in cli.stdout, cli.stderr
