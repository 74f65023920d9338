"""DyPRAG end to end: base model -> PRAG LoRAs -> parameter translators -> evaluation.

    python -m train.dyprag configs/dyprag/default.yaml [key=value ...]
    python -m train.dyprag generate runs/<run> --doc doc.txt --out adapter/ [--design shared]
    python -m train.dyprag report runs/<run> [--out docs/results/dyprag.md]

Stages, each finished by a marker `stages/<name>.json` in the run directory, so
running the same command again resumes after the last finished stage:
  data                 documents (synthetic fictional people, or JSONL files)
  base                 tokenizer + tiny Llama pretrained on the synthetic corpus
                       (skipped when model.path names a local model)
  prag                 one LoRA per training and test document (stage 1)
  translator_<design>  one parameter translator per design (stage 2)
  eval                 the comparison on held-out documents (stage 3)
The tables are then printed and written, with plots, to results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.lora import export_peft_adapter, find_lora_targets, load_loras, save_loras, stack_loras
from models.translator import (
    ParameterTranslator,
    TranslatorConfig,
    TranslatorMismatchError,
    embed_documents,
    load_translator,
    save_translator,
    translator_loss,
)
from train.checkpoint import RunDirError, atomic_write, atomic_write_text, prepare_run_dir
from train.config import ConfigError, load_config, to_yaml
from train.dyprag.base import build_tiny_llama, encode_pairs, load_base, pretrain, train_tokenizer
from train.dyprag.config import DyPragConfig
from train.dyprag.data import docs_from_prag, load_docs_jsonl, make_knowledge_set, qa_prompt, qa_target, tokenizer_corpus, docs_jsonl
from train.dyprag.prag import train_doc_loras, train_peft
from train.dyprag.report import write_report

STAGES_DIR = "stages"


# -----------------------------------------------------------------------------
# run directory and stage markers


class Run:
    def __init__(self, cfg: DyPragConfig, root: Path):
        self.cfg, self.root = cfg, root

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
        return Path(self.cfg.model.path) if self.cfg.model.path else self.root / "base_model"

    def docs(self, split: str):
        return load_docs_jsonl(self.root / "data" / f"{split}.jsonl")


def _comparable(cfg: DyPragConfig) -> str:
    """The config as it decides the results (overwrite/results_out do not)."""
    return to_yaml(dataclasses.replace(cfg, overwrite=False, results_out=""))


def open_run(cfg: DyPragConfig) -> Run:
    root = Path(cfg.runs_dir) / cfg.run_name
    saved = root / "config.yaml"
    if saved.is_file() and not cfg.overwrite:
        old = load_config(DyPragConfig, saved)
        if _comparable(old) != _comparable(cfg):
            raise RunDirError(
                f"{root} holds a run of a different config; pass overwrite=true to delete it and start again, "
                "or choose another run_name"
            )
        return Run(cfg, root)  # same config: resume after the last finished stage
    prepare_run_dir(root, resume=False, overwrite=cfg.overwrite)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, to_yaml(cfg))
    return Run(cfg, root)


# -----------------------------------------------------------------------------
# input checks (before any work)


def external_docs(c, path: str):
    if c.source == "jsonl":
        return load_docs_jsonl(path)
    return docs_from_prag(path, c.prag_dataset or None, c.augment_model or None)


def check_inputs(cfg: DyPragConfig) -> None:
    """Every file the config names, and the target modules, are checked here: ValueError."""
    if cfg.data.source != "synthetic":
        for f in (cfg.data.train_file, cfg.data.test_file):
            external_docs(cfg.data, f)
    if cfg.model.path:
        model, _ = load_base(cfg.model.path)
        find_lora_targets(model, cfg.prag.target_modules)
    else:  # the tiny Llama's Linear names, from a throwaway instance
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            tiny = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
        find_lora_targets(tiny, cfg.prag.target_modules)


# -----------------------------------------------------------------------------
# stages


def stage_data(run: Run) -> dict:
    c = run.cfg.data
    ks = make_knowledge_set(c.n_train_docs, c.n_test_docs, c.n_known, c.seed)
    known = [dataclasses.asdict(e) for e in ks.known]  # the tiny base model's closed-book facts, whatever the source
    if c.source == "synthetic":
        splits = {"train": ks.train, "test": ks.test}
    else:
        splits = {"train": external_docs(c, c.train_file), "test": external_docs(c, c.test_file)}
    for split, docs in splits.items():
        atomic_write_text(run.root / "data" / f"{split}.jsonl", docs_jsonl(docs))
    atomic_write_text(run.root / "data" / "known_entities.json", json.dumps(known))
    return {split: len(docs) for split, docs in splits.items()}


def stage_base(run: Run) -> dict:
    c = run.cfg.model
    if c.path:
        return {"base_model": c.path, "pretrained_here": False}
    from train.dyprag.data import Entity

    known = [Entity(**e) for e in json.loads((run.root / "data" / "known_entities.json").read_text())]
    tokenizer = train_tokenizer(tokenizer_corpus(4000, run.cfg.data.seed, run.docs("train") + run.docs("test")), c.vocab_size)
    torch.manual_seed(run.cfg.data.seed)
    model = build_tiny_llama(tokenizer, c.hidden, c.layers, c.heads, c.intermediate, c.max_len)
    info = pretrain(model, tokenizer, known, steps=c.steps, batch_size=c.batch_size, lr=c.lr, max_len=c.max_len, seed=run.cfg.data.seed, log=run.log)
    tmp = run.root / "base_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run.base_dir, ignore_errors=True)
    tmp.rename(run.base_dir)
    return {"base_model": str(run.base_dir), "pretrained_here": True, "parameters": sum(p.numel() for p in model.parameters()), **info}


def stage_prag(run: Run) -> dict:
    c = run.cfg.prag
    model, tokenizer = load_base(run.base_dir)
    info = {}
    for split in ("train", "test"):
        loras, s_per_doc = train_doc_loras(model, tokenizer, run.docs(split), c, run.cfg.model.max_len, desc=f"PRAG LoRAs ({split})")
        path = run.root / "prag" / f"{split}.safetensors"
        atomic_write(path, lambda tmp: save_loras(tmp, stack_loras(loras)))
        info[f"{split}_s_per_doc"] = s_per_doc
    one = loras[0]
    info["bytes_per_doc"] = sum((A.numel() + B.numel()) * 4 for A, B in one.values())
    # reference timing: the same training with one peft model per document, one after another
    docs = run.docs("test")[: c.time_peft_docs]
    t0 = time.perf_counter()
    for d in docs:
        train_peft(model, tokenizer, d, target_modules=c.target_modules, rank=c.rank, alpha=c.alpha, lr=c.lr, epochs=c.epochs, seed=c.init_seed, max_len=run.cfg.model.max_len)
    info["peft_sequential_s_per_doc"] = (time.perf_counter() - t0) / max(1, len(docs))
    return info


def qa_batch(tokenizer, docs, max_len: int) -> tuple[dict, list[int]]:
    """All augmentation QA of `docs` in closed-book form, and the document of each row."""
    pairs, doc_of_row = [], []
    for i, d in enumerate(docs):
        for q in d.qa:
            pairs.append((qa_prompt(q.question), qa_target(q.answer)))
            doc_of_row.append(i)
    return encode_pairs(tokenizer, pairs, max_len), doc_of_row


def stage_translator(run: Run, design: str) -> dict:
    c, p = run.cfg.translator, run.cfg.prag
    model, tokenizer = load_base(run.base_dir)
    docs = run.docs("train")
    targets = find_lora_targets(model, p.target_modules)
    target_loras = load_loras(run.root / "prag" / "train.safetensors")
    emb_ND = embed_documents(model, tokenizer, [d.passage for d in docs], pooling=c.pooling)
    torch.manual_seed(c.seed)
    tcfg = TranslatorConfig(design=design, hidden=c.hidden, rank=p.rank, pooling=c.pooling)
    translator = ParameterTranslator(tcfg, emb_ND.shape[1], targets)
    translator.set_input_stats(emb_ND)
    opt = torch.optim.AdamW(translator.parameters(), lr=c.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(docs) // c.batch_docs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs * steps_per_epoch)
    rng = random.Random(c.seed)
    step, t0 = 0, time.perf_counter()
    for epoch in tqdm(range(c.epochs), desc=f"translator ({design})", leave=False):
        order = list(range(len(docs)))
        rng.shuffle(order)
        for start in range(0, len(order), c.batch_docs):
            idx = order[start : start + c.batch_docs]
            batch, doc_of_row = qa_batch(tokenizer, [docs[i] for i in idx], run.cfg.model.max_len)
            rows = torch.tensor(doc_of_row)
            generated = translator(emb_ND[idx])
            gen_rows = {n: (A[rows], B[rows]) for n, (A, B) in generated.items()}
            tgt_rows = {n: (A[idx][rows], B[idx][rows]) for n, (A, B) in target_loras.items()}
            loss, parts = translator_loss(model, gen_rows, tgt_rows, batch, p.alpha / p.rank, c.lambda_kl, c.lambda_mse)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run.log({"stage": f"translator_{design}", "step": step, "epoch": epoch, "train_loss": parts["loss"], **parts})
            step += 1
    path = run.root / "translator" / f"{design}.safetensors"
    atomic_write(path, lambda tmp: save_translator(tmp, translator))
    return {
        "design": design,
        "train_seconds": time.perf_counter() - t0,
        "steps": step,
        "final": parts,
        "parameters": sum(t.numel() for t in translator.parameters()),
        "path": str(path),
    }


def stage_eval(run: Run) -> dict:
    from train.dyprag.evaluate import evaluate_run

    return evaluate_run(run)


# -----------------------------------------------------------------------------
# entry points


def run_pipeline(run: Run) -> Path:
    cfg = run.cfg
    torch.set_num_threads(cfg.threads)
    stages = [("data", lambda: stage_data(run)), ("base", lambda: stage_base(run)), ("prag", lambda: stage_prag(run))]
    stages += [(f"translator_{d}", lambda d=d: stage_translator(run, d)) for d in cfg.translator.designs]
    stages += [("eval", lambda: stage_eval(run))]
    first_todo = next((i for i, (name, _) in enumerate(stages) if run.done(name) is None), len(stages))
    for name, _ in stages[first_todo:]:  # later stages depend on the one that is missing: redo them
        (run.root / STAGES_DIR / f"{name}.json").unlink(missing_ok=True)
    for name, fn in stages:
        if run.done(name) is not None:
            print(f"[dyprag] stage {name}: already done, skipped", flush=True)
            continue
        print(f"[dyprag] stage {name} ...", flush=True)
        t0 = time.perf_counter()
        info = fn()
        info["stage_seconds"] = time.perf_counter() - t0
        run.finish(name, info)
        print(f"[dyprag] stage {name}: done in {info['stage_seconds']:.1f}s", flush=True)
    text = write_report(run.root)
    print(text)
    if cfg.results_out:
        Path(cfg.results_out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.results_out), text)
    return run.root


def generate(run_dir: Path, doc_file: Path, out_dir: Path, design: str | None, translator_path: Path | None) -> Path:
    """The translator's LoRA for one document, written as a standard peft adapter."""
    cfg = load_config(DyPragConfig, run_dir / "config.yaml")
    if not doc_file.is_file():
        raise ValueError(f"--doc: document file not found: {doc_file}")
    text = doc_file.read_text().strip()
    if not text:
        raise ValueError(f"--doc: {doc_file} is empty")
    design = design or cfg.translator.designs[0]
    if translator_path is None:
        translator_path = run_dir / "translator" / f"{design}.safetensors"
        if not translator_path.is_file():
            raise ValueError(f"{run_dir} has no trained translator for design {design!r} ({translator_path}); finish the run first")
    base_dir = Path(cfg.model.path) if cfg.model.path else run_dir / "base_model"
    model, tokenizer = load_base(base_dir)
    targets = find_lora_targets(model, cfg.prag.target_modules)
    translator = load_translator(translator_path, targets, model.config.hidden_size)
    with torch.no_grad():
        loras = translator(embed_documents(model, tokenizer, [text], pooling=translator.cfg.pooling))
    export_peft_adapter(loras, base_dir, cfg.prag.target_modules, cfg.prag.rank, cfg.prag.alpha, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "generate":
            p = argparse.ArgumentParser(prog="python -m train.dyprag generate")
            p.add_argument("run", type=Path)
            p.add_argument("--doc", type=Path, required=True, help="text file with the document")
            p.add_argument("--out", type=Path, required=True, help="adapter directory to write")
            p.add_argument("--design", choices=["shared", "per_module"], default=None)
            p.add_argument("--translator", type=Path, default=None, help="translator checkpoint (default: the run's)")
            a = p.parse_args(argv[1:])
            if not (a.run / "config.yaml").is_file():
                raise ValueError(f"{a.run} is not a DyPRAG run directory (no config.yaml)")
            print(generate(a.run, a.doc, a.out, a.design, a.translator))
        elif argv and argv[0] == "report":
            p = argparse.ArgumentParser(prog="python -m train.dyprag report")
            p.add_argument("run", type=Path)
            p.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
            a = p.parse_args(argv[1:])
            if not (a.run / STAGES_DIR / "eval.json").is_file():
                raise ValueError(f"{a.run} has no finished evaluation stage")
            text = write_report(a.run)
            print(text)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(a.out, text)
        else:
            p = argparse.ArgumentParser(prog="python -m train.dyprag", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
            p.add_argument("config", type=Path)
            p.add_argument("overrides", nargs="*", help="key.sub=value")
            a = p.parse_args(argv)
            cfg = load_config(DyPragConfig, a.config, a.overrides)
            check_inputs(cfg)
            run = open_run(cfg)
    except (ConfigError, RunDirError, TranslatorMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if argv and argv[0] not in ("generate", "report"):
        run_pipeline(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
