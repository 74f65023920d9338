import torch

from train.data import DOMAINS, DataConfig, build_corpus, sample_windows, synthetic_samples


def test_synthetic_corpus_is_deterministic_labelled_and_split_disjoint():
    a, b = synthetic_samples(600, seed=3), synthetic_samples(600, seed=3)
    assert a == b
    assert synthetic_samples(600, seed=4) != a
    assert {d for _, d in a} == set(range(len(DOMAINS))) and len(DOMAINS) >= 5
    corpus = build_corpus(DataConfig(n_samples=3000, val_fraction=0.1))
    train_text = corpus.tokenizer.decode(corpus.train.tokens.tolist()).splitlines()
    val_text = corpus.tokenizer.decode(corpus.val.tokens.tolist()).splitlines()
    assert len(val_text) > 100 and not set(train_text) & set(val_text)
    # the domain label of every token is the domain of the sample it came from
    first = train_text[0]
    n = len(first) + 1
    assert corpus.train.domains[:n].unique().numel() == 1


def test_windows_are_next_token_pairs_with_domains():
    corpus = build_corpus(DataConfig(n_samples=200))
    x, y, d = sample_windows(corpus.train, torch.tensor([[0, 5], [9, 2]]), 16)
    assert x.shape == y.shape == d.shape == (2, 2, 16)
    assert torch.equal(x[0, 1, 1:], y[0, 1, :-1])
    assert torch.equal(d[1, 0], corpus.train.domains[10:26])


def test_bpe_tokenizer_round_trips_and_reloads(tmp_path):
    cfg = DataConfig(n_samples=500, tokenizer="bpe", bpe_vocab_size=300)
    corpus = build_corpus(cfg)
    assert 256 < corpus.tokenizer.vocab_size <= 300
    text = "sort 5 3 9 -> 3 5 9"
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text
    assert len(corpus.tokenizer.encode(text)) < len(text), "BPE should merge frequent pairs"
    corpus.tokenizer.save(tmp_path / "tok.json")
    again = build_corpus(cfg, tmp_path / "tok.json")
    assert torch.equal(again.train.tokens, corpus.train.tokens)


def test_text_files_become_domains(tmp_path):
    (tmp_path / "poems.txt").write_text("\n\n".join(f"roses are red number {i}" for i in range(300)))
    (tmp_path / "logs.txt").write_text("\n\n".join(f"INFO request {i} ok" for i in range(300)))
    corpus = build_corpus(DataConfig(path=str(tmp_path), val_fraction=0.2))
    assert corpus.domain_names == ["logs", "poems"]
    assert set(corpus.train.domains.unique().tolist()) == {0, 1}


# ---- the knowledge domain and the fixed validation set ------------------------------------


def test_knowledge_facts_are_deterministic_shared_and_worded_apart():
    from train.data import ATTRIBUTES, TEMPLATES, fact_table, knowledge_samples

    table = fact_table(50, seed=1)
    assert table == fact_table(50, seed=1) and table != fact_table(50, seed=2)
    assert len(table) == 50 * len(ATTRIBUTES) and len({(e, a) for e, a, _ in table}) == len(table)
    train, val = knowledge_samples(50, 1, "train"), knowledge_samples(50, 1, "val")
    assert train == knowledge_samples(50, 1, "train")
    assert len(val) == len(table) and len(train) == len(table) * (len(TEMPLATES) - 1)
    assert not set(train) & set(val), "a validation query is worded as in training"
    for e, a, v in table[:40]:  # every fact: stated in training in the other wordings, queried once in validation
        stated = [t for t in train if e in t and f" {a} " in f" {t.replace(':', ' ')} "]
        asked = [t for t in val if e in t and f" {a} " in f" {t.replace(':', ' ')} "]
        assert len(stated) == len(TEMPLATES) - 1 and len(asked) == 1
        assert all(t.endswith(f" {v}") for t in stated + asked)
    # every wording is seen in training (with other facts): only the pairing of fact and wording is new
    assert {t.split(" ")[0] for t in val} - {"the", "ask"} and all(any(w in t for t in train) for w in (" of ", "'s ", "ask "))


def test_validation_set_is_fixed_large_and_apart_from_training():
    cfg = DataConfig(n_samples=3000, val_tokens=20_000, knowledge_entities=30)
    corpus = build_corpus(cfg)
    assert len(corpus.val.tokens) >= 20_000 and corpus.domain_names[-1] == "knowledge"
    bigger = build_corpus(DataConfig(n_samples=6000, val_tokens=20_000, knowledge_entities=30))
    assert torch.equal(bigger.val.tokens, corpus.val.tokens), "the validation set depends on the training corpus size"
    train_text = set(corpus.tokenizer.decode(corpus.train.tokens.tolist()).splitlines())
    val_text = corpus.tokenizer.decode(corpus.val.tokens.tolist()).splitlines()
    assert not train_text & set(val_text)
    # every domain is there; the skill domains in equal numbers of samples
    counts = {d: 0 for d in range(len(corpus.domain_names))}
    starts = [0] + [i + 1 for i, t in enumerate(corpus.val.tokens.tolist()) if t == ord("\n")][:-1]
    for s in starts:
        counts[int(corpus.val.domains[s])] += 1
    assert counts[len(DOMAINS)] == 30 * 5 and len({counts[d] for d in range(len(DOMAINS))}) == 1
    assert build_corpus(DataConfig(n_samples=3000, val_tokens=20_000, knowledge_entities=0)).domain_names == list(DOMAINS)
