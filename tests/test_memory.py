"""The memory layers (models/memory/): product-key lookup against exhaustive search, where gradients go,
the EMA write rule on hand-made inputs, causality in the toy LM, exact save and resume."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.memory.ema_slot import EMASlotConfig, EMASlotMemory
from models.memory.product_key import ProductKeyConfig, ProductKeyMemory, product_key_topk
from models.memory.shared import ReadTracker
from models.transformer import FFN_KINDS
from train import checkpoint as ckpt
from train.config import ConfigError, load_config
from train.lm import SPARSE_FFN, LMRunConfig, build_model, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/lm/tiny.yaml"
# small tables on the tiny LM: memory in layer 1, layer 0 stays dense
SMALL = {"pkm": ["model.ffn=pkm", "model.first_k_dense=1", "pkm.n_keys=16", "pkm.heads=2", "pkm.query_dim=16",
                 "pkm.top_k=4"],
         "ema_slot": ["model.ffn=ema_slot", "model.first_k_dense=1", "ema_slot.n_slots=64", "ema_slot.key_dim=8",
                      "ema_slot.top_k=4", "ema_slot.threshold=0.95"]}


# ---- product-key memory -----------------------------------------------------------------


def exhaustive_topk(q_THQ, subkeys_H2NQ, k):
    """Score all N*N full keys [c1_i | c2_j] of every head, entry i * N + j, and take the k best."""
    N = subkeys_H2NQ.shape[2]
    full_HEQ = torch.cat([subkeys_H2NQ[:, 0].repeat_interleave(N, dim=1), subkeys_H2NQ[:, 1].repeat(1, N, 1)], dim=-1)
    return torch.einsum("thq,heq->the", q_THQ, full_HEQ).topk(k, dim=-1)


@pytest.mark.parametrize("seed,heads,n_keys,k", [(0, 1, 8, 1), (1, 3, 16, 5), (2, 2, 32, 32), (3, 4, 7, 7)])
def test_product_key_topk_equals_exhaustive_search(seed, heads, n_keys, k):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(50, heads, 12, generator=g)
    subkeys = torch.randn(heads, 2, n_keys, 6, generator=g)
    scores, entry = product_key_topk(q, subkeys, k)
    ref_scores, ref_entry = exhaustive_topk(q, subkeys, k)
    order = scores.argsort(dim=-1, descending=True)
    torch.testing.assert_close(scores.gather(-1, order), ref_scores)
    assert torch.equal(entry.gather(-1, order), ref_entry)  # the same entries (ranked alike)


def pkm_reference(m: ProductKeyMemory, x_TD):
    """The layer's output by brute force: every full key scored, the k best read as a dense weighted sum."""
    cfg = m.cfg
    q = m.query(x_TD).view(-1, cfg.heads, 2, cfg.query_dim // 2)
    q = (q / q.square().mean(-1, keepdim=True).add(torch.finfo(q.dtype).eps).sqrt()).flatten(-2)
    scores, entry = exhaustive_topk(q, m.subkeys, cfg.top_k)
    read = (F.softmax(scores, dim=-1).unsqueeze(-1) * m.values[entry]).sum(dim=(1, 2))
    return m.output.out(read * F.silu(m.output.gate(x_TD))) if cfg.gated else read


@pytest.mark.parametrize("gated", [True, False])
def test_product_key_layer_matches_brute_force(gated):
    torch.manual_seed(0)
    m = ProductKeyMemory(ProductKeyConfig(d_model=24, n_keys=10, heads=3, query_dim=8, top_k=4, gated=gated))
    x = torch.randn(2, 7, 24)
    y, aux = m(x)
    torch.testing.assert_close(y, pkm_reference(m, x.view(-1, 24)).view(2, 7, 24))
    assert aux.losses == {}


def test_product_key_gradients_reach_only_the_read_values_their_subkeys_and_the_query_network():
    torch.manual_seed(0)
    cfg = ProductKeyConfig(d_model=16, n_keys=12, heads=2, query_dim=8, top_k=3)
    m = ProductKeyMemory(cfg)
    x = torch.randn(5, 16)
    y, _ = m(x)
    y.backward(torch.randn_like(y))
    _, entry_THK = m.lookup(x)
    read = set(entry_THK.flatten().tolist())
    assert len(read) < cfg.n_entries / 4  # else "only the read rows" would say little
    assert set((m.values.grad != 0).any(dim=1).nonzero().flatten().tolist()) == read
    # sub-key i of half 0 (j of half 1) of head h gets a gradient only if a read entry of h uses it (not always
    # then: a sub-key that all k entries of a token share shifts their scores alike, which the softmax ignores)
    for h in range(cfg.heads):
        used = [set((entry_THK[:, h] // cfg.n_keys).flatten().tolist()), set((entry_THK[:, h] % cfg.n_keys).flatten().tolist())]
        for half in (0, 1):
            moved = set((m.subkeys.grad[h, half] != 0).any(dim=1).nonzero().flatten().tolist())
            assert moved and moved <= used[half]
    for p in (m.query.weight, m.output.gate.weight, m.output.out.weight):
        assert p.grad.abs().sum() > 0


def test_read_tracker_counts_reads_per_step_and_dead_entries():
    t = ReadTracker(4, dead_after=2).train()
    history = [[0, 1], [1], [], [1]]  # entries read in each optimizer step
    for idx in history:
        t.count(torch.tensor(idx, dtype=torch.long))
        t.flush()
    assert t.last_read.tolist() == [0, 3, -1, -1] and int(t.step) == 4
    m = t.metrics(t.count(torch.tensor([2, 2])))
    assert m["read_share"] == 0.25 and m["table_read"] == 0.5
    assert m["dead_share"] == 0.75  # 0 last read at step 0 and 2, 3 never: none in steps 2..3
    t.eval().count(torch.tensor([3]))
    t.flush()
    assert t.last_read[3] == -1, "eval-mode reads are not recorded"


# ---- EMA slot memory: the write rule -----------------------------------------------------


def slots(w=0.5, **kw):
    """A 5-slot memory with keys and values of width 2, the first four filled by hand."""
    m = EMASlotMemory(EMASlotConfig(d_model=2, n_slots=5, key_dim=2, top_k=2, ema=w, usage_decay=0.5, **kw))
    m.keys.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [0, 0]]))
    m.values.copy_(torch.tensor([[10.0, 10], [20, 20], [30, 30], [40, 40], [0, 0]]))
    m.filled.copy_(torch.tensor([True, True, True, True, False]))
    m.usage.copy_(torch.tensor([8.0, 2, 4, 6, 0]))
    return m


def test_ema_write_follows_the_rule_exactly_and_leaves_other_slots_untouched():
    m = slots(w=0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    key = torch.tensor([[2.0, 0], [4.0, 0], [0, 6], [5, 5], [7, 7], [9, 9]])
    value = torch.tensor([[2.0, 4], [6, 8], [100, 0], [1, 1], [2, 2], [3, 3]])
    # writes 0 and 1 merge into slot 0 in that order, write 2 into slot 1; 3, 4, 5 match nothing
    slot = torch.tensor([0, 0, 1, -1, -1, -1])
    m.write(key, value, slot, reads_L=torch.tensor([0.0, 0, 0, 2, 0]))
    # slot 0: 0.5 * (0.5 * [1, 0] + 0.5 * [2, 0]) + 0.5 * [4, 0] = [2.75, 0]; value likewise
    assert m.keys[0].tolist() == [2.75, 0] and m.values[0].tolist() == [6, 7.5]
    assert m.keys[1].tolist() == [0, 3.5] and m.values[1].tolist() == [60, 10]
    # usage after decay 0.5 + reads + merges: [6, 2, 2, 5, 0]; slots 2, 3, 4 take no merge, least used first:
    # 4 (0), 2 (2), 3 (5). Three unmatched writes: 3 -> slot 4, 4 -> slot 2, 5 -> slot 3
    assert m.keys[4].tolist() == [5, 5] and m.keys[2].tolist() == [7, 7] and m.keys[3].tolist() == [9, 9]
    assert m.values[4].tolist() == [1, 1] and m.values[2].tolist() == [2, 2] and m.values[3].tolist() == [3, 3]
    assert m.filled.all() and m.usage.tolist() == [6.0, 2.0, 1.0, 1.0, 1.0]
    # a write touches its own slot only
    m2 = slots(w=0.5)
    m2.write(key[:1], value[:1], slot[:1], reads_L=torch.zeros(5))
    for name in ("keys", "values"):
        assert torch.equal(getattr(m2, name)[1:], before[name][1:]), name


def test_ema_more_unmatched_writes_than_free_slots_the_last_ones_win():
    m = slots(w=0.5)
    key = torch.tensor([[0.0, 3], [1, 1], [2, 2], [3, 3], [4, 4]])
    m.write(key, key * 10, torch.tensor([1, -1, -1, -1, -1]), reads_L=torch.zeros(5))
    # usage after decay: [4, 2, 2, 3, 0]; slot 1 merges, so free are 4 (0), 2 (2), 3 (3), 0 (4)
    assert m.keys[4].tolist() == [1, 1] and m.keys[2].tolist() == [2, 2] and m.keys[3].tolist() == [3, 3]
    assert m.keys[0].tolist() == [4, 4], "four unmatched writes, four free slots: even the most used one"
    m = slots(w=0.5)
    m.write(torch.tensor([[9.0, 9], [1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]), torch.zeros(6, 2),
            torch.full((6,), -1), reads_L=torch.zeros(5))
    # six unmatched writes, five free slots (usage [4, 1, 2, 3, 0] -> order 4, 1, 2, 3, 0): the first write is lost
    assert [m.keys[s, 0].item() for s in (4, 1, 2, 3, 0)] == [1, 2, 3, 4, 5]


def sequential_write(m, key, value, slot, reads):
    """Reference: one write at a time, in order."""
    w = m.cfg.ema
    merges = torch.bincount(slot[slot >= 0], minlength=m.cfg.n_slots)
    for n in range(len(slot)):
        if slot[n] >= 0:
            m.keys[slot[n]] = w * m.keys[slot[n]] + (1 - w) * key[n]
            m.values[slot[n]] = w * m.values[slot[n]] + (1 - w) * value[n]
    m.usage.mul_(m.cfg.usage_decay).add_(reads + merges)
    free = sorted((s for s in range(m.cfg.n_slots) if merges[s] == 0), key=lambda s: (m.usage[s].item(), s))
    new = [n for n in range(len(slot)) if slot[n] < 0][-len(free):] if free else []
    for s, n in zip(free, new):
        m.keys[s], m.values[s], m.filled[s], m.usage[s] = key[n], value[n], True, 1.0


def test_ema_batched_write_equals_one_write_at_a_time():
    torch.manual_seed(0)
    for trial in range(5):
        cfg = EMASlotConfig(d_model=3, n_slots=12, key_dim=4, top_k=2, ema=0.8, usage_decay=0.9)
        fast, slow = EMASlotMemory(cfg), EMASlotMemory(cfg)
        state = {"keys": torch.randn(12, 4), "values": torch.randn(12, 3), "usage": torch.rand(12) * 5,
                 "filled": torch.rand(12) < 0.7}
        for m in (fast, slow):
            m.load_state_dict({**m.state_dict(), **state})
        n = 20 + 5 * trial
        key, value, reads = torch.randn(n, 4), torch.randn(n, 3), torch.randint(0, 3, (12,)).float()
        slot = torch.where(torch.rand(n) < 0.6, torch.randint(0, 12, (n,)), -1)
        fast.write(key, value, slot, reads)
        sequential_write(slow, key, value, slot, reads)
        for name in ("keys", "values", "usage", "filled"):
            torch.testing.assert_close(getattr(fast, name), getattr(slow, name), msg=name)


def test_ema_forward_queues_next_position_values_matched_against_the_table():
    m = slots(w=0.5, threshold=0.9).train()
    with torch.no_grad():
        m.query.weight.copy_(torch.eye(2))  # the query is the (normalised) input
    x = torch.tensor([[[3.0, 0.1], [0, -2], [5, 5]]])
    y, aux = m(x)
    assert not torch.equal(y, torch.zeros_like(y))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    (_, value, slot), = m.queue
    assert torch.equal(value, x[0, 1:]), "a position writes the next position's input"
    assert slot.tolist() == [0, 3], "[3, .1] is nearest slot 0 ([1, 0]), [0, -2] slot 3 ([0, -1])"
    assert aux.metrics["write_match"] == 1.0
    m.eval()(x)
    assert len(m.queue) == 1, "evaluation queues nothing"
    m.after_optimizer_step()
    assert m.queue == []
    q = F.rms_norm(x[0, :2], (2,))
    torch.testing.assert_close(m.keys[0], 0.5 * before["keys"][0] + 0.5 * q[0])
    torch.testing.assert_close(m.values[3], 0.5 * before["values"][3] + 0.5 * x[0, 2])
    for name in ("keys", "values"):
        assert torch.equal(getattr(m, name)[[1, 2, 4]], before[name][[1, 2, 4]]), name


def test_ema_reads_nothing_from_an_empty_table_and_gradients_reach_query_gate_and_output():
    torch.manual_seed(0)
    m = EMASlotMemory(EMASlotConfig(d_model=8, n_slots=16, key_dim=4, top_k=4)).train()
    x = torch.randn(2, 6, 8)
    y, aux = m(x)
    assert torch.equal(y, torch.zeros_like(y)) and aux.metrics["filled"] == 0
    m.after_optimizer_step()
    assert m.filled.sum() == 10  # 2 sequences x 5 positions with a next one
    y, _ = m(x)
    y.sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in m.parameters())
    assert {n for n, _ in m.named_parameters()} == {"query.weight", "output.gate.weight", "output.out.weight"}


# ---- both layers in the toy LM -------------------------------------------------------------


def small_model(kind, *overrides):
    torch.manual_seed(0)
    return build_model(load_config(LMRunConfig, TINY, [*SMALL[kind], *overrides]))


def fill(model, kind):
    """A few training steps' worth of writes (EMA slots) and reads, so the table is not empty."""
    for seed in range(3):
        model(torch.randint(256, (4, 32), generator=torch.Generator().manual_seed(seed)))
        model.after_optimizer_step()
    if kind == "ema_slot":
        assert model.blocks[1].ffn.filled.float().mean() > 0.5


@pytest.mark.parametrize("kind", ["pkm", "ema_slot"])
def test_causal_in_the_lm_in_training_mode_with_writes_queued(kind):
    model = small_model(kind).train()
    fill(model, kind)
    idx = torch.randint(256, (3, 32), generator=torch.Generator().manual_seed(9))
    full = model(idx).logits
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    diff = (model(changed).logits - full).abs().amax(dim=(0, 2))
    assert diff[:20].max() == 0, "a later token changed an earlier output"
    assert diff[20:].min() > 0
    # each prefix alone gives the same outputs: writes queued by the longer forward passes changed nothing
    for t in (1, 7, 20):
        torch.testing.assert_close(model(idx[:, :t]).logits, full[:, :t], rtol=0, atol=1e-5)
    memory = model.blocks[1].ffn
    if kind == "ema_slot":  # ... and are applied at the step, after which outputs change
        assert len(memory.queue) > 0
        model.after_optimizer_step()
        assert not torch.allclose(model(idx).logits, full)


def test_every_ffn_kind_builds_a_layer():
    assert set(FFN_KINDS) == {"dense", *SPARSE_FFN}
    for kind, layer in (("pkm", ProductKeyMemory), ("ema_slot", EMASlotMemory)):
        model = small_model(kind)
        assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", layer.__name__]
        assert model.blocks[1].ffn.cfg.d_model == 32


def test_active_parameters_count_what_a_token_reads():
    pkm = small_model("pkm").blocks[1].ffn
    # query 32x(2x16), sub-keys 2x2x16x8, 2 heads x 4 rows of 32, gate and output 2 x 32x32
    assert pkm.active_parameters() == 32 * 32 + 2 * 2 * 16 * 8 + 2 * 4 * 32 + 2 * 32 * 32
    assert pkm.values.numel() == 256 * 32
    ema = small_model("ema_slot").blocks[1].ffn
    # query 32x8, gate and output 2 x 32x32, 64 slot keys of 8 scored, 4 values of 32 read
    assert ema.active_parameters() == 32 * 8 + 2 * 32 * 32 + 64 * 8 + 4 * 32


@pytest.mark.parametrize("overrides,message", [
    (["pkm.top_k=20"], "pkm.top_k=20 must be <= n_keys=16"),
    (["pkm.query_dim=15"], "pkm.query_dim=15 must be even"),
    (["pkm.gated=false", "pkm.value_dim=8"], "pkm.value_dim=8 must equal d_model"),
    (["ema_slot.ema=1.0"], "ema_slot.ema=1.0 must be in [0, 1)"),
    (["ema_slot.top_k=100"], "ema_slot.top_k=100 must be <= n_slots=64"),
    (["ema_slot.threshold=1.5"], "ema_slot.threshold=1.5 must be a cosine similarity"),
    (["pkm.d_model=48"], "pkm.d_model=48 must be left unset"),
])
def test_bad_memory_config_names_the_key(overrides, message):
    kind = overrides[0].split(".")[0]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(LMRunConfig, TINY, [*SMALL[kind], *overrides])
    small_model(kind, *overrides[:-1])  # without the bad value the layer builds


# ---- save and resume -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pkm", "ema_slot"])
def test_state_dict_holds_the_table_and_its_records(kind):
    model = small_model(kind).train()
    fill(model, kind)
    state = model.state_dict()
    names = {"pkm": ["values", "reads.last_read", "reads.step"],
             "ema_slot": ["keys", "values", "usage", "filled", "reads.last_read", "reads.step"]}[kind]
    assert all(f"blocks.1.ffn.{n}" in state for n in names)
    copy = small_model(kind, "train.seed=5").train()
    copy.load_state_dict(state)
    idx = torch.randint(256, (2, 32))
    for m in (model, copy):  # one more training step each (the optimizer step itself is left out)
        m(idx)
        m.after_optimizer_step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, copy.state_dict()[k]), k
    torch.testing.assert_close(model(idx).logits, copy(idx).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["pkm", "ema_slot"])
def test_trainer_resume_is_exact_and_logs_the_memory_metrics(tmp_path, kind):
    overrides = [*SMALL[kind], "train.steps=20", "log.log_every=5", "log.ckpt_every=10"]

    def cfg(run_dir, *more):
        return load_config(LMRunConfig, TINY, [f"out_dir={tmp_path / run_dir}", *overrides, *more])
    full = train(cfg("a"))
    train(cfg("b", "train.stop_at=10"))
    resumed = train(cfg("b"), resume=True)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
             for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()] for s in (full, resumed)]
    assert rows[0] == rows[1]
    last = rows[0][-1]
    assert 0 < last["layer1/read_share"] <= 1 and 0 < last["layer1/table_read"] <= 1 and "layer1/dead_share" in last
    if kind == "ema_slot":
        assert last["layer1/filled"] > 0 and "layer1/write_match" in last
    weights = [ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(s["run_dir"])))[0] for s in (full, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    assert int(weights[0]["blocks.1.ffn.reads.step"]) == 20


@pytest.mark.slow
def test_ddp_two_processes_write_the_same_table_as_one_process(tmp_path, one_and_two_processes):
    """Each rank queues the writes of its half of the global batch; the step applies both halves in rank
    order, which is the order one process sees them in, so the tables match a one-process run."""
    one_and_two_processes([str(TINY), *SMALL["ema_slot"], "train.steps=8", "log.log_every=1", "log.eval_every=4",
                           "log.ckpt_every=8"], 8, 29531)
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / d / "tiny"))[0] for d in ("one", "two"))
    assert torch.equal(a["blocks.1.ffn.filled"], b["blocks.1.ffn.filled"])
    for name in ("keys", "values", "usage"):
        torch.testing.assert_close(a[f"blocks.1.ffn.{name}"], b[f"blocks.1.ffn.{name}"], atol=1e-4, rtol=1e-4)
    assert torch.equal(a["blocks.1.ffn.reads.last_read"], b["blocks.1.ffn.reads.last_read"])
