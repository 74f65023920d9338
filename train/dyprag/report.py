"""Tables and plots of a finished DyPRAG run: results.md + PNGs in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.checkpoint import atomic_write_text  # noqa: E402
from train.plots import heatmap, loss_curve, read_metrics  # noqa: E402

BASELINE_ROWS = ["Vanilla", "Standard RAG", "PRAG", "PRAG-Combine"]
DESIGN_ROWS = ["DyPRAG", "DyPRAG-Combine", "Shuffled doc (control)"]
CONTROL_ROWS = ["Mean LoRA (control)"]
SEEN_ROWS = [("PRAG (training docs)", None), ("DyPRAG (training docs)", "design")]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _load(run: Path) -> tuple[dict, dict]:
    # in the order they finished, which is the pipeline's order
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((run / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)}
    return stages, json.loads((run / "eval" / "results.json").read_text())


def quality_table(res: dict, design: str) -> str:
    d = res["designs"][design]["rows"]
    rows = [(n, res["rows"][n]) for n in BASELINE_ROWS] + [(n, d[n]) for n in DESIGN_ROWS] + [(n, res["rows"][n]) for n in CONTROL_ROWS]
    rows += [("PRAG, training docs (seen)", res["rows"]["PRAG (training docs)"]), ("DyPRAG, training docs (seen)", d["DyPRAG (training docs)"])]
    return _table(["method", "EM", "F1", "questions"], [[n, f"{r['em']:.1f}", f"{r['f1']:.1f}", str(r["n"])] for n, r in rows])


def similarity_table(res: dict) -> str:
    rows = [["PRAG target LoRAs", f"{res['target_cosine_between_docs']:.3f}", "", ""]]
    for design, d in res["designs"].items():
        rows.append([f"DyPRAG {design}", f"{d['generated_cosine_between_docs']:.3f}", f"{d['cosine_generated_vs_own_target']:.3f}", f"{d['cosine_generated_vs_other_target']:.3f}"])
    return _table(["LoRAs (dense deltas B·A, test docs)", "cos between different docs", "cos to own target", "cos to other docs' targets"], rows)


def cost_table(stages: dict, res: dict) -> str:
    prag = stages["prag"]
    rows = [
        ["PRAG fine-tune, batched (s/doc)", f"{prag['test_s_per_doc']:.3f}"],
        ["PRAG fine-tune, one peft model at a time (s/doc)", f"{prag['peft_sequential_s_per_doc']:.3f}"],
    ]
    for design, d in res["designs"].items():
        s = d["translator_s_per_doc"]
        rows.append([f"DyPRAG {design}: embed + translator forward (s/doc)", f"{s:.4f}"])
        rows.append([f"  ratio batched PRAG / DyPRAG {design}", f"{prag['test_s_per_doc'] / s:.1f}x"])
        rows.append([f"  translator parameters ({design})", f"{d['translator_parameters']:,}"])
        rows.append([f"  translator bytes fp32 ({design})", f"{4 * d['translator_parameters']:,}"])
    rows.append(["LoRA bytes stored per doc, PRAG (fp32)", f"{prag['bytes_per_doc']:,}"])
    rows.append(["LoRA bytes stored per doc, DyPRAG (generated on demand)", "0"])
    rows.append(["prompt tokens per question, Standard RAG", f"{res['prompt_tokens']['rag']:.1f}"])
    rows.append(["prompt tokens per question, DyPRAG / PRAG", f"{res['prompt_tokens']['dyprag']:.1f}"])
    return _table(["cost", "value"], rows)


def setup_text(cfg: dict, stages: dict, res: dict) -> list[str]:
    """What was run, read from the resolved config."""
    d, m, p, t = cfg["data"], cfg["model"], cfg["prag"], cfg["translator"]
    base = stages["base"]
    if base.get("pretrained_here"):
        model = (
            f"a tiny Llama ({m['layers']} layers, width {m['hidden']}, {base['parameters']:,} parameters, BPE vocabulary "
            f"{m['vocab_size']}) pretrained here for {base['pretrain_steps']} steps ({base['pretrain_seconds']:.0f}s) on the synthetic corpus"
        )
    else:
        model = f"the local model `{base['base_model']}`"
    data = (
        f"{d['n_train_docs']} training and {d['n_test_docs']} held-out documents about generated fictional people "
        "(5 facts each; entities disjoint between the splits); augmentations = a rewrite + one QA pair per fact; "
        "evaluation questions use other wordings than the augmentation QA"
        if d["source"] == "synthetic" else f"documents from `{d['train_file']}` (train) and `{d['test_file']}` (test)"
    )
    return [
        f"- Base model: {model}.",
        f"- Data: {data}.",
        f"- PRAG (stage 1): LoRA rank {p['rank']}, alpha {p['alpha']:g} on {', '.join(p['target_modules'])}, "
        f"lr {p['lr']:g}, {p['epochs']} epochs, batch size 1 per document, same initialization for every document.",
        f"- Translator (stage 2): designs {', '.join(t['designs'])}, width {t['hidden']}, {t['pooling']}-token document embedding, "
        f"{t['epochs']} epochs, lr {t['lr']:g}; loss = LM + {t['lambda_kl']:g} KL + {t['lambda_mse']:g} MSE.",
        "- EM/F1: SQuAD answer normalization, greedy decoding. \"Seen\" rows use training documents' "
        "evaluation questions: what the translator does on documents it was trained on.",
    ]


def observations(res: dict) -> list[str]:
    """Plain statements read off the numbers (no tuning, no selection)."""
    r = res["rows"]
    em = lambda row: row["em"]  # noqa: E731
    out = [
        f"- Standard RAG {em(r['Standard RAG']):.1f} EM vs Vanilla {em(r['Vanilla']):.1f}: the base model "
        f"{'reads' if em(r['Standard RAG']) > em(r['Vanilla']) + 10 else 'barely reads'} the passage in its prompt.",
        f"- PRAG {em(r['PRAG']):.1f} EM vs Standard RAG {em(r['Standard RAG']):.1f}; PRAG-Combine {em(r['PRAG-Combine']):.1f}.",
    ]
    for design, d in res["designs"].items():
        dr = d["rows"]
        control = max(em(r["Vanilla"]), em(dr["Shuffled doc (control)"]), em(r["Mean LoRA (control)"]))
        gap, p, n = em(dr["DyPRAG"]) - control, em(dr["DyPRAG"]) / 100, dr["DyPRAG"]["n"]
        noise = 2 * 100 * max(p * (1 - p), 1 / n) ** 0.5 / n**0.5  # ~2 standard errors of an EM over n questions
        verdict = "above them" if gap > noise else "not clearly above them (within ~2 standard errors)" if gap > -noise else "below them"
        out.append(
            f"- `{design}`: DyPRAG {em(dr['DyPRAG']):.1f} EM on held-out documents vs {em(dr['DyPRAG (training docs)']):.1f} on seen ones; "
            f"best of the Vanilla / shuffled / mean-LoRA controls {control:.1f}: DyPRAG is {verdict} ({gap:+.1f}, 2 s.e. ~{noise:.1f}). "
            f"DyPRAG-Combine {em(dr['DyPRAG-Combine']):.1f} vs Standard RAG {em(r['Standard RAG']):.1f}. "
            f"Generated LoRAs of different documents have cosine {d['generated_cosine_between_docs']:.2f} "
            f"(PRAG targets: {res['target_cosine_between_docs']:.2f}); cosine to their own target "
            f"{d['cosine_generated_vs_own_target']:.3f} vs {d['cosine_generated_vs_other_target']:.3f} to other documents' targets."
        )
    return out


def _plots(run: Path, res: dict) -> list[str]:
    names = []
    # EM per row and design
    designs = list(res["designs"])
    labels = BASELINE_ROWS + DESIGN_ROWS + CONTROL_ROWS
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(designs)
    for k, design in enumerate(designs):
        allrows = {**res["rows"], **res["designs"][design]["rows"]}
        ax.bar([i + k * width for i in range(len(labels))], [allrows[n]["em"] for n in labels], width, label=design)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right")
    ax.set(ylabel="EM (%)", title="Held-out documents: exact match")
    ax.legend(title="translator design")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "em.png", dpi=110)
    plt.close(fig)
    names.append("em.png")
    metrics = read_metrics(run / "metrics.jsonl")
    for design in designs:
        loss_curve([m for m in metrics if m.get("stage") == f"translator_{design}"], run / f"translator_loss_{design}.png", f"translator training loss ({design})")
        names.append(f"translator_loss_{design}.png")
        m = res["designs"][design]["cosine_matrix_generated"]
        heatmap(m, [f"doc {i}" for i in range(len(m))], "test document", run / f"cosine_generated_{design}.png", f"cosine between generated LoRAs ({design})", "cosine")
        names.append(f"cosine_generated_{design}.png")
    m = res["cosine_matrix_target"]
    heatmap(m, [f"doc {i}" for i in range(len(m))], "test document", run / "cosine_target.png", "cosine between PRAG target LoRAs", "cosine")
    names.append("cosine_target.png")
    return names


def write_report(run: Path) -> str:
    """results.md (returned) and plots, from the run's stage markers and eval/results.json."""
    run = Path(run)
    stages, res = _load(run)
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    parts = [
        f"# DyPRAG results: {run.name}",
        "",
        f"Written by `python -m train.dyprag <config>` (or `python -m train.dyprag report {run}`); "
        "the resolved config is `config.yaml` in the run directory.",
        "",
        *setup_text(cfg, stages, res),
        "",
        "## Observations",
        "",
        *observations(res),
    ]
    for design in res["designs"]:
        parts += ["", f"## Quality, translator design `{design}`", "", quality_table(res, design)]
    parts += ["", "## Does the generated LoRA depend on the document?", "", similarity_table(res)]
    parts += ["", "## Cost", "", cost_table(stages, res)]
    timing = [[name, f"{info.get('stage_seconds', 0):.1f}"] for name, info in stages.items()]
    parts += ["", "## Stage times", "", _table(["stage", "seconds"], timing)]
    plots = _plots(run, res)
    parts += ["", "Plots (in the run directory): " + ", ".join(plots), ""]
    text = "\n".join(parts)
    atomic_write_text(run / "results.md", text)
    return text
