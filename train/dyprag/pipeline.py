"""DyPRAG end to end: base model -> PRAG LoRAs -> doc-to-LoRA translators -> evaluation, per seed.

    python -m train.dyprag configs/dyprag/default.yaml [key=value ...]
    python -m train.dyprag generate runs/<run> --doc doc.txt --out adapter/ [--design D] [--seed K]
    python -m train.dyprag report runs/<run> [--out docs/results/dyprag.md]

A run directory holds the resolved `config.yaml`, one folder `seed_<k>/` per seed
and the report over seeds (`results.md`, plots). Each seed runs these stages,
each finished by a marker `seed_<k>/stages/<name>.json`, so running the same
command again resumes after the last finished stage:
  data                 held-out documents (test, ood_<axis>), or the user's files
  base                 tokenizer + tiny Llama pretrained on the synthetic corpus
                       (skipped when model.path names a local model)
  prag                 one LoRA per held-out document (and per training document
                       of a fixed pool when distilling): the PRAG rows
  translator_<design>  one translator per design, trained end to end on
                       thousands of fresh documents (train_translator.py)
  eval                 the comparison on held-out documents (evaluate.py)
Seeds run in `jobs` processes at once, each with `threads` torch threads. A run
directory is used by one process at a time (train.checkpoint.run_dir_lock).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import torch

from moe_playground.models.lora import export_peft_adapter, find_lora_targets, load_loras, save_loras, stack_loras
from moe_playground.models.translator import TranslatorMismatchError, document_states, load_translator, resolve_layers, save_translator
from moe_playground.train.checkpoint import RunDirError, atomic_write, atomic_write_text, check_deletable, check_run_name, clear_run_dir, mark_run_dir, run_dir_lock
from moe_playground.train.config import ConfigError, load_config, to_yaml
from moe_playground.train.dyprag.base import build_tiny_llama, load_base, pretrain, train_tokenizer
from moe_playground.train.dyprag.config import DyPragConfig
from moe_playground.train.dyprag.data import Doc, Entity, docs_from_prag, docs_jsonl, load_docs_jsonl, make_knowledge_set, tokenizer_corpus
from moe_playground.train.dyprag.prag import train_doc_loras, train_peft
from moe_playground.train.dyprag.report import write_report
from moe_playground.train.dyprag.train_translator import train_translator

STAGES_DIR = "stages"
TOKENIZER_DOCS = 400  # training documents (besides pretraining samples) the BPE tokenizer is fitted on


# -----------------------------------------------------------------------------
# run directory, seeds and stage markers


def seed_dir(root: Path, seed: int) -> Path:
    return root / f"seed_{seed}"


class Run:
    """One seed of a run: its folder, stage markers and documents."""

    def __init__(self, cfg: DyPragConfig, root: Path, seed: int):
        self.cfg, self.root, self.seed = cfg, root, seed

    def done(self, stage: str) -> dict | None:
        path = self.root / STAGES_DIR / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, info: dict) -> dict:
        atomic_write_text(self.root / STAGES_DIR / f"{stage}.json", json.dumps(info, indent=1))
        return info

    def log(self, record: dict) -> None:
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    @property
    def base_dir(self) -> Path:
        return Path(self.cfg.model.path_for(self.seed)) if self.cfg.model.path else self.root / "base_model"

    def knowledge_set(self):
        d = self.cfg.data
        return make_knowledge_set(d.n_test_docs, d.n_ood_docs, d.n_known, self.seed, d.ood_axes, d.augment_wordings)

    def has_split(self, split: str) -> bool:
        return (self.root / "data" / f"{split}.jsonl").is_file()

    def eval_splits(self) -> list[str]:
        """The held-out splits this seed has: test, then the out-of-distribution ones."""
        return ["test"] + sorted(p.stem for p in (self.root / "data").glob("ood_*.jsonl"))

    def docs(self, split: str) -> list[Doc]:
        return load_docs_jsonl(self.root / "data" / f"{split}.jsonl")

    def training_docs(self):
        """The translator's documents: the fixed pool (a list) if there is one, else an endless stream."""
        return self.docs("train") if self.has_split("train") else self.knowledge_set().training_docs()


def _comparable(cfg: DyPragConfig) -> str:
    """The config as it decides the results (overwrite/results_out/jobs/notes do not)."""
    return to_yaml(dataclasses.replace(cfg, overwrite=False, results_out="", jobs=1, notes=""))


def open_run(cfg: DyPragConfig) -> Path:
    """The run's root folder, made or checked for this config (call it holding run_dir_lock(root)).

    Same config: resume. Another config: refused unless overwrite=true, which deletes only a
    run directory this project made (train.checkpoint.check_deletable)."""
    root = Path(cfg.runs_dir) / cfg.run_name
    saved = root / "config.yaml"
    if saved.is_file() and _comparable(load_config(DyPragConfig, saved)) == _comparable(cfg) and not cfg.overwrite:
        atomic_write_text(saved, to_yaml(cfg))  # the same run: take the new notes / results_out
        return root
    if root.is_dir() and any(p.name != ".lock" for p in root.iterdir()):
        if not cfg.overwrite:
            what = "a run of a different config" if saved.is_file() else "files that are not a DyPRAG run"
            raise RunDirError(f"{root} holds {what}; pass overwrite=true to delete it and start again, or choose another run_name")
        check_deletable(root)
        clear_run_dir(root)
    mark_run_dir(root)
    atomic_write_text(saved, to_yaml(cfg))
    return root


# -----------------------------------------------------------------------------
# input checks (before any work)


def external_docs(c, path: str) -> list[Doc]:
    if c.source == "jsonl":
        return load_docs_jsonl(path)
    return docs_from_prag(path, c.prag_dataset or None, c.augment_model or None)


def check_inputs(cfg: DyPragConfig) -> None:
    """Every file the config names, the target modules and layers read are checked here: ValueError."""
    check_run_name(cfg.run_name)
    if cfg.data.source != "synthetic":
        for f in (cfg.data.train_file, cfg.data.test_file):
            external_docs(cfg.data, f)
    if cfg.model.path:
        for seed in cfg.seeds:
            model, _ = load_base(cfg.model.path_for(seed))
    else:  # the tiny Llama's Linear names, from a throwaway instance
        from transformers import LlamaConfig, LlamaForCausalLM

        m = cfg.model
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=m.hidden, intermediate_size=m.intermediate, num_hidden_layers=m.layers, num_attention_heads=m.heads))
    find_lora_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    resolve_layers(cfg.translator.read_layers, model.config.num_hidden_layers)


# -----------------------------------------------------------------------------
# stages


def stage_data(run: Run) -> dict:
    c = run.cfg.data
    ks = run.knowledge_set()
    if c.source == "synthetic":
        splits = {"test": ks.test, **{f"ood_{a}": docs for a, docs in ks.ood.items()}}
        if c.n_train_docs:
            splits["train"] = list(islice(ks.training_docs(), c.n_train_docs))
    else:
        splits = {"train": external_docs(c, c.train_file), "test": external_docs(c, c.test_file)}
    for split, docs in splits.items():
        atomic_write_text(run.root / "data" / f"{split}.jsonl", docs_jsonl(docs))
    # the tiny base model's closed-book facts, whatever the source
    atomic_write_text(run.root / "data" / "known_entities.json", json.dumps([dataclasses.asdict(e) for e in ks.known]))
    return {split: len(docs) for split, docs in splits.items()}


def stage_base(run: Run) -> dict:
    c = run.cfg.model
    if c.path:
        return {"base_model": c.path_for(run.seed), "pretrained_here": False}
    known = [Entity(**e) for e in json.loads((run.root / "data" / "known_entities.json").read_text())]
    train_docs = run.training_docs()
    fit_docs = list(islice(train_docs, TOKENIZER_DOCS))
    tokenizer = train_tokenizer(tokenizer_corpus(4000, run.seed, fit_docs, run.cfg.data.augment_wordings), c.vocab_size)
    torch.manual_seed(run.seed)
    model = build_tiny_llama(tokenizer, c.hidden, c.layers, c.heads, c.intermediate, c.max_len)
    info = pretrain(model, tokenizer, known, steps=c.steps, batch_size=c.batch_size, lr=c.lr, max_len=c.max_len, seed=run.seed, log=run.log,
                    augment_wordings=run.cfg.data.augment_wordings)
    tmp = run.root / "base_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run.base_dir, ignore_errors=True)
    tmp.rename(run.base_dir)
    return {"base_model": str(run.base_dir), "pretrained_here": True, "parameters": sum(p.numel() for p in model.parameters()), **info}


def stage_prag(run: Run) -> dict:
    """PRAG LoRAs where a row needs them: held-out documents, a few training documents
    (the "seen" row), and the whole pool when the translator distills from them."""
    cfg = run.cfg
    model, tokenizer = load_base(run.base_dir)
    train_docs = run.training_docs()
    splits = {s: run.docs(s) for s in run.eval_splits()}
    splits["seen"] = list(islice(train_docs, cfg.eval.seen_docs))
    if cfg.train.distills:
        splits["train"] = train_docs
    info = {}
    for split, docs in splits.items():
        loras, s_per_doc = train_doc_loras(model, tokenizer, docs, cfg.lora, cfg.prag, cfg.model.max_len, desc=f"PRAG LoRAs ({split})")
        atomic_write(run.root / "prag" / f"{split}.safetensors", lambda tmp: save_loras(tmp, stack_loras(loras)))
        info[f"{split}_s_per_doc"] = s_per_doc
    info["bytes_per_doc"] = sum((A.numel() + B.numel()) * 4 for A, B in loras[0].values())
    # reference timing: the same training with one peft model per document, one after another
    docs = splits["test"][: cfg.prag.time_peft_docs]
    t0 = time.perf_counter()
    for d in docs:
        train_peft(model, tokenizer, d, cfg.lora, lr=cfg.prag.lr, epochs=cfg.prag.epochs, seed=cfg.prag.init_seed, max_len=cfg.model.max_len)
    info["peft_sequential_s_per_doc"] = (time.perf_counter() - t0) / max(1, len(docs))
    return info


def stage_translator(run: Run, design: str) -> dict:
    cfg = run.cfg
    model, tokenizer = load_base(run.base_dir)
    targets = find_lora_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    docs = run.training_docs()
    kw = dict(pool=docs) if isinstance(docs, list) else dict(stream=docs)
    if cfg.train.distills:
        kw["pool_loras"] = load_loras(run.root / "prag" / "train.safetensors")
    translator, info = train_translator(model, tokenizer, cfg, dataclasses.replace(cfg.translator, design=design), targets, seed=run.seed, log=run.log, **kw)
    path = run.root / "translator" / f"{design}.safetensors"
    atomic_write(path, lambda tmp: save_translator(tmp, translator))
    return {**info, "path": str(path)}


def stage_eval(run: Run) -> dict:
    from moe_playground.train.dyprag.evaluate import evaluate_run

    return evaluate_run(run)


# -----------------------------------------------------------------------------
# entry points


def run_seed(run: Run) -> None:
    """Every stage of one seed not yet finished, in order."""
    torch.set_num_threads(run.cfg.threads)
    stages = [("data", lambda: stage_data(run)), ("base", lambda: stage_base(run)), ("prag", lambda: stage_prag(run))]
    stages += [(f"translator_{d}", lambda d=d: stage_translator(run, d)) for d in run.cfg.designs]
    stages += [("eval", lambda: stage_eval(run))]
    first_todo = next((i for i, (name, _) in enumerate(stages) if run.done(name) is None), len(stages))
    for name, _ in stages[first_todo:]:  # later stages depend on the one that is missing: redo them
        (run.root / STAGES_DIR / f"{name}.json").unlink(missing_ok=True)
    tag = f"[dyprag seed {run.seed}]"
    for name, fn in stages:
        if run.done(name) is not None:
            print(f"{tag} stage {name}: already done, skipped", flush=True)
            continue
        print(f"{tag} stage {name} ...", flush=True)
        t0 = time.perf_counter()
        info = fn()
        info["stage_seconds"] = time.perf_counter() - t0
        run.finish(name, info)
        print(f"{tag} stage {name}: done in {info['stage_seconds']:.1f}s", flush=True)


def _seed_main(root: Path, seed: int) -> int:
    """`python -m train.dyprag _seed <root> <seed>`: one seed of a run, in its own process."""
    cfg = load_config(DyPragConfig, root / "config.yaml")
    with run_dir_lock(seed_dir(root, seed)):
        run_seed(Run(cfg, seed_dir(root, seed), seed))
    return 0


def run_pipeline(cfg: DyPragConfig, root: Path) -> Path:
    """Every seed (in `jobs` processes at once when jobs > 1), then the report over seeds."""
    todo = [k for k in cfg.seeds if not (seed_dir(root, k) / STAGES_DIR / "eval.json").is_file()]
    for k in cfg.seeds:
        if k not in todo:
            print(f"[dyprag seed {k}] every stage already done, skipped", flush=True)
    if cfg.jobs == 1:
        for k in todo:
            _seed_main(root, k)
    else:
        running: list[tuple[int, subprocess.Popen]] = []
        failed = []
        while todo or running:
            while todo and len(running) < cfg.jobs:
                k = todo.pop(0)
                running.append((k, subprocess.Popen([sys.executable, "-m", "moe_playground.train.dyprag", "_seed", str(root), str(k)])))
            time.sleep(1)
            for k, proc in list(running):
                if proc.poll() is not None:
                    running.remove((k, proc))
                    if proc.returncode != 0:
                        failed.append(k)
        if failed:
            raise RuntimeError(f"seeds {failed} failed (their output is above); run the same command again to resume them")
    text = write_report(root)
    print(text)
    if cfg.results_out:
        atomic_write_text(Path(cfg.results_out), text)
    return root


def generate(run_dir: Path, doc_file: Path, out_dir: Path, design: str | None, seed: int | None, translator_path: Path | None) -> Path:
    """The translator's LoRA for one document, written as a standard peft adapter."""
    cfg = load_config(DyPragConfig, run_dir / "config.yaml")
    if not doc_file.is_file():
        raise ValueError(f"--doc: document file not found: {doc_file}")
    text = doc_file.read_text().strip()
    if not text:
        raise ValueError(f"--doc: {doc_file} is empty")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out: {out_dir} exists and is not empty; choose a new folder (nothing was written)")
    design = design or cfg.designs[0]
    if design not in cfg.designs:
        raise ValueError(f"--design {design!r}: this run trained {cfg.designs}")
    seed = cfg.seeds[0] if seed is None else seed
    if seed not in cfg.seeds:
        raise ValueError(f"--seed {seed}: this run has seeds {cfg.seeds}")
    run = Run(cfg, seed_dir(run_dir, seed), seed)
    if translator_path is None:
        translator_path = run.root / "translator" / f"{design}.safetensors"
        if not translator_path.is_file():
            raise ValueError(f"{run_dir} has no trained translator for design {design!r} ({translator_path}); finish the run first")
    model, tokenizer = load_base(run.base_dir)
    targets = find_lora_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    layers = resolve_layers(cfg.translator.read_layers, model.config.num_hidden_layers)
    translator = load_translator(translator_path, targets, len(layers) * model.config.hidden_size)
    with torch.no_grad():
        loras = translator(*document_states(model, tokenizer, [text], layers))
    export_peft_adapter(loras, run.base_dir, cfg.lora.target_modules, cfg.lora.rank, cfg.lora.alpha, out_dir, cfg.lora.layers)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "_seed":
            return _seed_main(Path(argv[1]), int(argv[2]))
        if argv and argv[0] == "generate":
            p = argparse.ArgumentParser(prog="python -m train.dyprag generate", allow_abbrev=False)
            p.add_argument("run", type=Path)
            p.add_argument("--doc", type=Path, required=True, help="text file with the document")
            p.add_argument("--out", type=Path, required=True, help="adapter directory to write (new or empty)")
            p.add_argument("--design", default=None, help="translator design (default: the run's translator.design)")
            p.add_argument("--seed", type=int, default=None, help="which seed's translator (default: the first)")
            p.add_argument("--translator", type=Path, default=None, help="translator checkpoint (default: the run's)")
            a = p.parse_args(argv[1:])
            if not (a.run / "config.yaml").is_file():
                raise ValueError(f"{a.run} is not a DyPRAG run directory (no config.yaml)")
            print(generate(a.run, a.doc, a.out, a.design, a.seed, a.translator))
            return 0
        if argv and argv[0] == "report":
            p = argparse.ArgumentParser(prog="python -m train.dyprag report", allow_abbrev=False)
            p.add_argument("run", type=Path)
            p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
            a = p.parse_args(argv[1:])
            if not list(a.run.glob(f"seed_*/{STAGES_DIR}/eval.json")):
                raise ValueError(f"{a.run} has no seed with a finished evaluation stage")
            text = write_report(a.run)
            print(text)
            if a.out:
                atomic_write_text(a.out, text)
            return 0
        p = argparse.ArgumentParser(prog="python -m train.dyprag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        p.add_argument("config", type=Path)
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        a = p.parse_args(argv)
        cfg = load_config(DyPragConfig, a.config, a.overrides)
        check_inputs(cfg)
        root = Path(cfg.runs_dir) / cfg.run_name
        with run_dir_lock(root):
            run_pipeline(cfg, open_run(cfg))
    except (ConfigError, RunDirError, TranslatorMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
