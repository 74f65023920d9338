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
