"""The run-directory guard: nothing the user made is deleted, one process per run directory, plain run names."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.lm import LMRunConfig, main
from train.sweep.spec import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/lm/tiny.yaml")


def users_files(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its bytes: what a test checks is left as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path):
    """A user's folder: their own file, a runs folder with a finished run of another name in it."""
    (tmp_path / "notes.txt").write_text("the user's notes")
    runs = tmp_path / "runs"
    assert main([TINY, f"out_dir={runs}", "run_name=other", "train.steps=5"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("not a run")
    return tmp_path


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\x"])
def test_run_name_must_be_a_plain_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run_name=.* must be a plain folder name"):
        load_config(LMRunConfig, TINY, [f"out_dir={tmp_path}", f"run_name={name}"])


@pytest.mark.parametrize("out_dir, run_name", [("runs", "."), ("runs", ".."), (".", "mine")],
                         ids=["run_name=.", "run_name=..", "a user's folder"])
def test_overwrite_leaves_everything_the_user_made(workspace, capsys, out_dir, run_name):
    before = users_files(workspace)
    assert main([TINY, f"out_dir={workspace / out_dir}", f"run_name={run_name}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "must be a plain folder name" in err or "not a run directory made by this project" in err, err
    assert users_files(workspace) == before


def test_overwrite_still_restarts_a_run_of_this_project(workspace):
    run = workspace / "runs" / "other"
    assert main([TINY, f"out_dir={workspace / 'runs'}", "run_name=other", "train.steps=10", "--overwrite"]) == 0
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and (run / ckpt.RUN_MARKER).is_file()


def test_a_sweep_named_dot_dot_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: '..'\nconfig: {TINY}\nout_dir: {tmp_path / 'sweeps'}\nvariants: {{a: {{}}}}\n")
    with pytest.raises(SweepError, match=r"name='\.\.' must be a plain folder name"):
        load_sweep(path)


def test_abbreviated_flags_are_not_taken(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([TINY, f"out_dir={tmp_path}", "--over"])
    assert exit_.value.code == 2 and "unrecognized arguments: --over" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from train.checkpoint import run_dir_lock
    with run_dir_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_process_on_a_locked_run_stops_at_once(workspace, capsys):
    run = workspace / "runs" / "other"
    before = users_files(workspace)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for flag in ("--overwrite", "--resume"):
            assert main([TINY, f"out_dir={workspace / 'runs'}", "run_name=other", "train.steps=5", flag]) == 2
            assert f"in use by another process (pid {holder.pid})" in capsys.readouterr().err
        assert users_files(workspace) == {**before, "runs/other/.lock": f"{holder.pid}\n".encode()}
    finally:
        holder.kill()
        holder.wait()
    with ckpt.run_dir_lock(run):  # the lock ends with its process, however it dies
        pass


def test_clearing_a_sweep_waits_for_none_of_its_runs_in_use(tmp_path):
    sweep, run = tmp_path / "sweep", tmp_path / "sweep" / "a-s0"
    for d in (sweep, run):
        ckpt.mark_run_dir(d)
    (run / "metrics.jsonl").write_text("{}\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.RunDirBusy):
            ckpt.clear_run_dir(sweep)
        assert (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    ckpt.clear_run_dir(sweep)
    assert [p.name for p in sweep.iterdir()] == [ckpt.LOCK_FILE]


def test_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_an_empty_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    assert main([str(tmp_path / "empty.yaml"), f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "the config file is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
