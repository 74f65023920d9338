"""The results page of a DyPRAG run: every seed's eval/results.json, as mean and standard error over seeds.

results.md (returned) and plots land in the run directory. Observations are
read off the numbers; a claim is called true only when its gap exceeds two
standard errors (the larger of the spread over paired seeds and the binomial one over questions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moe_playground.train.checkpoint import atomic_write_text  # noqa: E402
from moe_playground.train.dyprag.config import DataConfig, TrainConfig  # noqa: E402
from moe_playground.train.plots import read_metrics  # noqa: E402

BASELINE_ROWS = ["Vanilla", "Standard RAG", "PRAG", "PRAG-Combine"]
DESIGN_ROWS = ["DyPRAG", "DyPRAG-Combine", "Shuffled doc (control)", "Mean LoRA (control)", "Standard RAG + mean LoRA (control)"]
OOD_AXIS_TEXT = {
    "values": "occupations, employer kinds and birth years never seen",
    "wordings": "question wordings never seen",
    "style": "a passage sentence style never seen",
    "all": "the three at once",
}
SEEN_ROWS = {"PRAG (training docs)": False, "DyPRAG (training docs)": True}  # row -> one per design?
AUGMENTATION_ROWS = {"Standard RAG (augmentation questions)": False, "DyPRAG (augmentation questions)": True}  # held-out docs, training wordings


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _fmt(xs: list[float], digits: int = 1) -> str:
    m, se = mean_se(xs)
    return f"{m:.{digits}f}" if math.isnan(se) else f"{m:.{digits}f} ± {se:.{digits}f}"


class Seeds:
    """Per-seed results, read as lists over seeds."""

    def __init__(self, run: Path):
        self.dirs = sorted((p for p in run.glob("seed_*") if (p / "eval" / "results.json").is_file()), key=lambda p: int(p.name[5:]))
        if not self.dirs:
            raise ValueError(f"{run} has no seed with eval/results.json")
        self.res = [json.loads((d / "eval" / "results.json").read_text()) for d in self.dirs]
        # in the order they finished, which is the pipeline's order
        self.stages = [{p.stem: json.loads(p.read_text()) for p in sorted((d / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)} for d in self.dirs]
        self.designs = list(self.res[0]["designs"])
        self.splits = list(self.res[0]["splits"])

    def row(self, split: str, name: str, design: str | None = None) -> list[dict] | None:
        """One row's result dict per seed (None if absent)."""
        out = []
        for r in self.res:
            rows = r["designs"][design]["rows"].get(split, {}) if design else r["splits"][split]["rows"]
            if name not in rows:
                return None
            out.append(rows[name])
        return out

    def rows(self, split: str, design: str) -> list[tuple[str, list[dict]]]:
        named = [(n, self.row(split, n)) for n in BASELINE_ROWS] + [(n, self.row(split, n, design)) for n in DESIGN_ROWS]
        return [(n, r) for n, r in named if r is not None]

    def augmentation_rows(self, design: str) -> list[tuple[str, list[dict]]]:
        """Standard RAG and DyPRAG on the held-out documents' augmentation questions (absent in older runs)."""
        named = [(n, self.row("test", n, design if per_design else None)) for n, per_design in AUGMENTATION_ROWS.items()]
        return [(n, r) for n, r in named if r is not None]

    def design(self, design: str, key: str) -> list[float]:
        return [r["designs"][design][key] for r in self.res if r["designs"][design].get(key) is not None]


def quality_table(S: Seeds, split: str, design: str, seen: bool) -> str:
    rows = S.rows(split, design)
    if seen:
        rows += [(f"{n.split(' (')[0]}, training docs (seen)", r) for n, per_design in SEEN_ROWS.items() if (r := S.row(split, n, design if per_design else None))]
        rows += S.augmentation_rows(design)
    body = [[n, _fmt([x["em"] for x in r]), _fmt([x["f1"] for x in r]), " / ".join(f"{x['em']:.1f}" for x in r), str(r[0]["n"])] for n, r in rows]
    return _table(["method", "EM", "F1", "EM per seed", "questions per seed"], body)


def kind_table(S: Seeds, split: str, design: str) -> str:
    rows = [(n, r) for n, r in S.rows(split, design) if n in ("Standard RAG", "PRAG", "DyPRAG", "DyPRAG-Combine", "Shuffled doc (control)")]
    rows += S.augmentation_rows(design) if split == "test" else []
    kinds = list(rows[0][1][0]["em_by_kind"])
    body = [[n] + [_fmt([x["em_by_kind"].get(k, float("nan")) for x in r], 0) for k in kinds] for n, r in rows]
    return _table(["method (EM)"] + kinds, body)


def similarity_table(S: Seeds) -> str:
    rows = [["PRAG LoRAs", _fmt([r["target_cosine_between_docs"] for r in S.res if r["target_cosine_between_docs"] is not None], 3), "", ""]]
    for d in S.designs:
        rows.append([f"DyPRAG `{d}`", _fmt(S.design(d, "generated_cosine_between_docs"), 3),
                     _fmt(S.design(d, "cosine_generated_vs_own_target"), 3), _fmt(S.design(d, "cosine_generated_vs_other_target"), 3)])
    return _table(["LoRAs (dense deltas B·A, test docs)", "cos between different docs", "cos to own PRAG LoRA", "cos to other docs' PRAG LoRAs"], rows)


def cost_table(S: Seeds) -> str:
    prag = [s["prag"] for s in S.stages]
    batched, seq = [p["test_s_per_doc"] for p in prag], [p["peft_sequential_s_per_doc"] for p in prag]
    rows = [["PRAG fine-tune, batched (s/doc)", _fmt(batched, 3)], ["PRAG fine-tune, one peft model at a time (s/doc)", _fmt(seq, 3)]]
    for d in S.designs:
        s = S.design(d, "translator_s_per_doc")
        tr = [st[f"translator_{d}"] for st in S.stages]
        rows += [
            [f"DyPRAG `{d}`: token states + translator forward (s/doc)", _fmt(s, 4)],
            [f"  PRAG (one peft model at a time) / DyPRAG `{d}`", _fmt([a / b for a, b in zip(seq, s)], 0) + "x"],
            [f"  PRAG (batched) / DyPRAG `{d}`", _fmt([a / b for a, b in zip(batched, s)], 0) + "x"],
            [f"  translator parameters `{d}`", f"{S.res[0]['designs'][d]['translator_parameters']:,}"],
            ["  translator training (s), documents read", f"{_fmt([t['train_seconds'] for t in tr], 0)}, {tr[0]['documents_seen']:,}"],
        ]
    rows += [
        ["LoRA bytes stored per doc, PRAG (fp32)", f"{prag[0]['bytes_per_doc']:,}"],
        ["prompt tokens per question, Standard RAG", f"{S.res[0]['prompt_tokens']['rag']:.1f}"],
        ["prompt tokens per question, DyPRAG / PRAG", f"{S.res[0]['prompt_tokens']['dyprag']:.1f}"],
    ]
    return _table(["cost", "value"], rows)


def _em(r: list[dict] | None) -> list[float]:
    return [x["em"] for x in r] if r else []


def _gap(a: list[float], b: list[float], n_questions: int) -> tuple[float, float]:
    """Mean of a - b over seeds and two standard errors. The s.e. is the larger of the one over
    paired seeds and the binomial one over all questions (N = questions x seeds): with two seeds
    the seed spread alone can be 0 by chance, which would call any difference real."""
    diffs = [x - y for x, y in zip(a, b)]
    m, seed_se = mean_se(diffs)
    N = n_questions * len(a)
    pa, pb = (min(max(sum(v) / len(v) / 100, 0), 1) for v in (a, b))
    question_se = 100 * math.sqrt(max(pa * (1 - pa), 1 / N) / N + max(pb * (1 - pb), 1 / N) / N)
    return m, 2 * (question_se if math.isnan(seed_se) else max(seed_se, question_se))


def _verdict(a: list[float], b: list[float], n: int, relation: str) -> tuple[bool, str]:
    """Does `a relation b` hold? relation: 'above' (a > b beyond 2 s.e.), 'at least' (not below beyond 2 s.e.), 'same' (within 2 s.e.)."""
    m, two_se = _gap(a, b, n)
    ok = {"above": m > two_se, "at least": m >= -two_se, "same": abs(m) <= two_se}[relation]
    return ok, f"{m:+.1f} (2 s.e. {two_se:.1f})"


def targets_section(S: Seeds, design: str) -> list[str]:
    """The issue's targets for this design on held-out test documents, each met or missed."""
    em = lambda name, d=None: _em(S.row("test", name, d))  # noqa: E731
    n = S.row("test", "Vanilla")[0]["n"]
    lines = []

    def claim(text: str, ok: bool, detail: str) -> None:
        lines.append(f"| {text} | {'met' if ok else '**missed**'} | {detail} |")

    dy, rag = em("DyPRAG", design), em("Standard RAG")
    controls = [em("Vanilla"), em("Shuffled doc (control)", design), em("Mean LoRA (control)", design)]
    gaps = [_verdict(dy, c, n, "above") for c in controls]
    claim("DyPRAG above Vanilla, shuffled-document and mean-LoRA controls", all(ok for ok, _ in gaps), "; ".join(d for _, d in gaps))
    claim("DyPRAG EM >= Standard RAG", *_verdict(dy, rag, n, "at least"))
    if em("PRAG"):
        m, _ = _gap(dy, em("PRAG"), n)
        lines.append(f"| DyPRAG as close to PRAG as possible | gap | {m:+.1f} EM |")
    comb = em("DyPRAG-Combine", design)
    ok1, d1 = _verdict(comb, dy, n, "above")
    ok2, d2 = _verdict(comb, rag, n, "above")
    claim("DyPRAG-Combine above DyPRAG and above Standard RAG", ok1 and ok2, f"vs DyPRAG {d1}; vs Standard RAG {d2}")
    for control in ("Shuffled doc (control)", "Mean LoRA (control)"):
        claim(f"{control} within 2 s.e. of Vanilla", *_verdict(em(control, design), em("Vanilla"), n, "same"))
    seq = [st["prag"]["peft_sequential_s_per_doc"] / r["designs"][design]["translator_s_per_doc"] for st, r in zip(S.stages, S.res)]
    claim("generating a LoRA >= 100x cheaper than PRAG's fine-tuning (one peft model at a time)", min(seq) >= 100, f"{_fmt(seq, 0)}x (worst seed {min(seq):.0f}x)")
    cos = S.design(design, "generated_cosine_between_docs")
    claim("generated LoRAs of different documents: cosine <= 0.3", max(cos) <= 0.3, f"{_fmt(cos, 3)} (worst seed {max(cos):.3f})")
    return ["| target | verdict | difference |", "|---|---|---|", *lines]


def observations(S: Seeds) -> list[str]:
    """Plain statements read off the numbers (no tuning, no selection)."""
    em = lambda split, name, d=None: _em(S.row(split, name, d))  # noqa: E731
    n = S.row("test", "Vanilla")[0]["n"]
    rag, van = em("test", "Standard RAG"), em("test", "Vanilla")
    out = [f"- Standard RAG {_fmt(rag)} EM vs Vanilla {_fmt(van)}: the base model "
           f"{'reads' if _verdict(rag, van, n, 'above')[0] else 'does not clearly read'} the passage in its prompt."]
    for d in S.designs:
        dy = em("test", "DyPRAG", d)
        controls = {c: em("test", c, d) for c in ("Shuffled doc (control)", "Mean LoRA (control)")}
        above = all(_verdict(dy, c, n, "above")[0] for c in controls.values()) and _verdict(dy, van, n, "above")[0]
        seen = em("test", "DyPRAG (training docs)", d)
        out.append(
            f"- `{d}`: DyPRAG {_fmt(dy)} EM on held-out documents ({_fmt(seen)} on training documents); it is "
            f"{'above' if above else 'NOT clearly above'} Vanilla and both controls (shuffled document {_fmt(controls['Shuffled doc (control)'])}, "
            f"mean LoRA {_fmt(controls['Mean LoRA (control)'])}): the generated LoRA {'carries' if above else 'does not carry'} the document. "
            f"DyPRAG-Combine {_fmt(em('test', 'DyPRAG-Combine', d))} vs Standard RAG {_fmt(rag)}."
        )
        aug = dict(S.augmentation_rows(d))
        if aug:
            dy_aug, rag_aug = _em(aug["DyPRAG (augmentation questions)"]), _em(aug["Standard RAG (augmentation questions)"])
            out.append(f"  Asked in the training wordings instead (the held-out documents' augmentation questions): DyPRAG {_fmt(dy_aug)} EM, "
                       f"Standard RAG {_fmt(rag_aug)}. A question wording the translator never trained on costs DyPRAG "
                       f"{_fmt([a - b for a, b in zip(dy_aug, dy)])} EM and Standard RAG {_fmt([a - b for a, b in zip(rag_aug, rag)])}.")
        for split in S.splits[1:]:
            out.append(f"  `{split}`: DyPRAG {_fmt(em(split, 'DyPRAG', d))} EM, Standard RAG {_fmt(em(split, 'Standard RAG'))}, "
                       f"PRAG {_fmt(em(split, 'PRAG'))}, shuffled document {_fmt(em(split, 'Shuffled doc (control)', d))}.")
    return out


def _plots(run: Path, S: Seeds) -> list[str]:
    names = []
    for split in S.splits:
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(S.designs)
        for k, d in enumerate(S.designs):
            rows = S.rows(split, d)
            means = [mean_se(_em(r)) for _, r in rows]
            ax.bar([i + k * width for i in range(len(rows))], [m for m, _ in means], width,
                   yerr=[0 if math.isnan(se) else se for _, se in means], label=d, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [n for n, _ in rows], rotation=30, ha="right")
        ax.set(ylabel="EM (%)", title=f"{split} documents: exact match (mean ± s.e. over {len(S.dirs)} seeds)")
        ax.legend(title="translator design")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / f"em_{split}.png", dpi=110)
        plt.close(fig)
        names.append(f"em_{split}.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    metrics = read_metrics(S.dirs[0] / "metrics.jsonl")
    for d in S.designs:
        rows = [m for m in metrics if m.get("stage") == f"translator_{d}"]
        ax.plot([m["docs_seen"] for m in rows], [m["lm"] for m in rows], label=d)
    ax.set(xlabel="training documents read", ylabel="answer cross-entropy (nats)", title=f"translator training ({S.dirs[0].name})", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "translator_loss.png", dpi=110)
    plt.close(fig)
    return names + ["translator_loss.png"]


def setup_text(cfg: dict, S: Seeds) -> list[str]:
    """What was run, read from the resolved config."""
    d, m, lo, p, t, tr = cfg["data"], cfg["model"], cfg["lora"], cfg["prag"], cfg["train"], cfg["translator"]
    base = S.stages[0]["base"]
    if base.get("pretrained_here"):
        model = (f"a tiny Llama ({m['layers']} layers, width {m['hidden']}, {base['parameters']:,} parameters, BPE vocabulary "
                 f"{m['vocab_size']} fitted on training text only) pretrained here for {base['pretrain_steps']} steps on the synthetic corpus, one per seed")
    else:
        model = f"the local model `{base['base_model']}`"
    if d["source"] == "synthetic":
        stream = (f"a fixed pool of {d['n_train_docs']} documents" if d["n_train_docs"]
                  else f"fresh documents streamed from a seeded generator ({t['steps']} steps x {t['docs_per_step']} = {t['steps'] * t['docs_per_step']:,} documents, never repeated)")
        asked = ("one augmentation question per fact in one wording" if d.get("augment_wordings", DataConfig.augment_wordings) == 1
                 else f"one augmentation question per fact in a random one of {d['augment_wordings']} wordings")
        data = (f"translator trained on {stream}, {asked}; evaluated on {d['n_test_docs']} held-out documents (test: fictional people "
                "never seen in training, 5 facts each, question wordings other than the training ones)"
                + (f"; and {d['n_ood_docs']} documents in each out-of-distribution split, one kind of novelty each: "
                   + ", ".join(f"`ood_{a}` ({OOD_AXIS_TEXT[a]})" for a in d["ood_axes"]) if d["n_ood_docs"] else ""))
    else:
        data = f"documents from `{d['train_file']}` (train) and `{d['test_file']}` (test)"
    layers = f" in layers {lo['layers']}" if lo["layers"] else ""
    decay = ("cosine decay to 0" if t.get("schedule", TrainConfig.schedule) == "cosine"
             else f"constant until a linear decay to 0 over the last {100 * t['decay_share']:g}% of the steps")
    return [
        f"- Seeds: {len(S.dirs)} ({', '.join(x.name for x in S.dirs)}); each seed has its own base model, documents and translators. "
        "Figures are mean ± standard error over seeds.",
        f"- Base model: {model}.",
        f"- Data: {data}.",
        f"- LoRA: rank {lo['rank']}, alpha {lo['alpha']:g} on {', '.join(lo['target_modules'])}{layers}.",
        f"- PRAG: lr {p['lr']:g}, {p['epochs']} epochs over each document's passage, rewrite and augmentation QA, batch size 1.",
        f"- Translator: designs {', '.join(f'`{x}`' for x in S.designs)}; width {tr['hidden']}, reads hidden states "
        f"{tr['read_layers'] or 'of every layer'}; {t['steps']} steps of {t['docs_per_step']} documents, AdamW lr {t['lr']:g}, "
        f"{t['warmup']} warmup steps, then {decay}; loss = answer cross-entropy under the generated LoRA"
        + (f" + {t['lambda_kl']:g} KL + {t['lambda_mse']:g} MSE to PRAG" if t["lambda_kl"] or t["lambda_mse"] else "")
        + (f" + {t['lambda_text']:g} x LM loss on the document's own text" if t.get("lambda_text") else "")
        + f"; {100 * t['p_passage']:.0f}% of training questions also carry the passage"
        + (f" ({100 * t['p_passage_decay']:.0f}% over the last {100 * t['decay_share']:.0f}% of the steps)" if t.get("p_passage_decay") is not None else "")
        + ("; steps under bf16 autocast (parameters fp32; PRAG and evaluation fp32)." if t.get("precision") == "bf16" else "."),
        "- EM/F1: SQuAD answer normalization, greedy decoding. \"Seen\" rows are training documents.",
    ]


def write_report(run: Path) -> str:
    """results.md (returned) and plots, from every finished seed of the run."""
    run = Path(run)
    S = Seeds(run)
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    parts = [
        f"# DyPRAG results: {run.name}",
        "",
        f"Written by `python -m train.dyprag <config>` (or `python -m train.dyprag report {run}`); "
        "the resolved config is `config.yaml` in the run directory.",
        "",
        *setup_text(cfg, S),
        "",
        "## Observations",
        "",
        *observations(S),
    ]
    if cfg.get("notes"):
        parts += ["", "## What was tried", "", cfg["notes"].strip()]
    for d in S.designs:
        parts += ["", f"## Targets, translator `{d}` (held-out test documents)", "", *targets_section(S, d)]
    for split in S.splits:
        for d in S.designs:
            parts += ["", f"## Quality on {split} documents, translator `{d}`", "", quality_table(S, split, d, seen=split == "test")]
            parts += ["", f"EM per fact type ({split}, `{d}`):", "", kind_table(S, split, d)]
    parts += ["", "## Does the generated LoRA depend on the document?", "", similarity_table(S)]
    parts += ["", "## Cost", "", cost_table(S)]
    stage_names = list(S.stages[0])
    timing = [[name, _fmt([st[name].get("stage_seconds", 0) for st in S.stages if name in st], 0)] for name in stage_names]
    parts += ["", "## Stage times (seconds, per seed)", "", _table(["stage", "seconds"], timing)]
    plots = _plots(run, S)
    parts += ["", "Plots (in the run directory): " + ", ".join(plots), ""]
    text = "\n".join(parts)
    atomic_write_text(run / "results.md", text)
    return text
