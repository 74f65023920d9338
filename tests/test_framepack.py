"""FramePack model: packing schedule, coarse patchifiers, positions, sampling orders, causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.framepack import Context, FramePack, FramePackConfig, Stage, fine_positions
from train.config import ConfigError, load_config
from train.framepack.sampling import ORDERS, gather_context, rollout, section_order, section_starts
from train.framepack.train import FramePackRunConfig

SMALL = dict(d_model=32, n_layer=2, n_head=2, ffn_hidden=64)


def model(**kw) -> FramePack:
    torch.manual_seed(0)
    return FramePack(FramePackConfig(**{**SMALL, **kw})).eval()


def side(m: FramePack, n: int, B: int = 2) -> torch.Tensor:
    """Tokens of one side of n known frames (nearest first, at times -1, -2, ...)."""
    return m.pack(torch.rand(B, n, 32, 32), [-1 - i for i in range(n)])


# ---- packing ----------------------------------------------------------------------------------


def test_tokens_per_frame_follow_the_schedule():
    m = model()  # stages: 2 frames at (1,8,8), 4 at (2,16,16), 16 at (4,32,32)
    per_frame = [16, 16 / 8, 16 / 64]  # 1x, 1/8 and 1/64 of the fine tokens per frame
    # known frames -> frames in each stage (whole kernel groups only)
    for n, frames in {0: [0, 0, 0], 1: [1, 0, 0], 2: [2, 0, 0], 4: [2, 2, 0], 6: [2, 4, 0], 10: [2, 4, 4],
                      22: [2, 4, 16], 30: [2, 4, 16]}.items():
        expected = sum(p * f for p, f in zip(per_frame, frames))
        assert side(m, n).shape[1] == m.cfg.side_tokens(n) == expected, n


def test_partial_kernel_groups_are_left_out():
    m = model()
    assert side(m, 3).shape[1] == 32      # the third frame would need a second frame for its (2,16,16) group
    assert side(m, 4).shape[1] == 32 + 4


def test_packed_context_is_bounded_and_full_context_grows():
    packed = model()
    full = model(schedule=[Stage([1, 8, 8], 0)])
    bound = packed.cfg.side_tokens(packed.cfg.max_side_frames)
    assert bound == 32 + 8 + 4
    assert [packed.cfg.side_tokens(n) for n in (22, 50, 500)] == [bound] * 3
    assert all(packed.cfg.side_tokens(n) <= bound for n in range(200))
    assert [full.cfg.side_tokens(n) for n in (10, 100)] == [160, 1600]
    assert full.cfg.max_side_frames is None
    # the model builds exactly the tokens the config counts: anchor + both sides
    ctx = Context(torch.rand(1, 32, 32), -30, torch.rand(1, 30, 32, 32), list(range(-1, -31, -1)),
                  torch.rand(1, 5, 32, 32), list(range(2, 7)))
    assert packed.context(ctx).shape[1] == packed.cfg.context_tokens(30, 5) == 16 + bound + (32 + 4)


def test_coarse_patchifiers_at_init_equal_the_fine_one_on_the_average_pooled_input():
    m = model()
    x = torch.rand(3, 1, 4, 32, 32)
    fine = m.patchify["1x8x8"]
    for name in ("2x16x16", "4x32x32"):
        conv = m.patchify[name]
        kt, kh, kw = conv.kernel_size
        pooled = F.avg_pool3d(x[:, :, :kt], (kt, kh // 8, kw // 8))
        torch.testing.assert_close(conv(x[:, :, :kt]), fine(pooled), rtol=1e-5, atol=1e-5)
    # not trivially: a tiled (rather than block-spread) copy of the fine kernel would differ
    w = fine.weight.repeat(1, 1, 2, 2, 2) / 8
    assert not torch.allclose(F.conv3d(x[:, :, :2], w, fine.bias, stride=(2, 16, 16)), m.patchify["2x16x16"](x[:, :, :2]), atol=1e-4)


def test_compressed_tokens_keep_their_mean_time_position():
    m = model()
    pe = m._positions([-5, -4], [2, 16, 16])  # one group of two frames -> 4 tokens
    fine = fine_positions(torch.tensor([-5, -4]), 4, 32)  # (2, 4, 4, D)
    torch.testing.assert_close(pe[0], fine[:, :2, :2].mean((0, 1, 2)))
    assert not torch.allclose(pe[0], m._positions([-7, -6], [2, 16, 16])[0])


def test_times_beyond_max_offset_are_clipped():
    m = model(max_offset=8)
    torch.testing.assert_close(m._positions([-100], [1, 8, 8]), m._positions([-8], [1, 8, 8]))


@pytest.mark.parametrize("override, key", [
    ("model.schedule=[{kernel: [2,16,16], frames: 3}]", "model.schedule[0].frames=3"),
    ("model.schedule=[{kernel: [1,12,12], frames: 1}]", "model.schedule[0].kernel height 12"),
    ("model.schedule=[{kernel: [1,8,8], frames: 0}, {kernel: [2,16,16], frames: 2}]", "model.schedule[0].frames=0"),
    ("model.patch=5", "model.patch=5"),
    ("train.clip_len=31", "train.clip_len=31"),
    ("train.modes=[forward]", "train.modes"),
    ("data.max_radius=14", "data.max_radius=14"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(FramePackRunConfig, "configs/framepack/base.yaml", [override])


# ---- sampling orders ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_each_order_visits_every_section_exactly_once(order):
    for n in range(1, 40):
        seq = section_order(order, n)
        assert sorted(seq) == list(range(n)) and len(seq) == n


def test_orders_are_what_they_say():
    assert section_order("causal", 5) == [0, 1, 2, 3, 4]
    assert section_order("bidirectional", 5)[:2] == [0, 4]  # the ends first, then between
    assert section_order("inverted", 5) == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="allowed"):
        section_order("random", 3)
    with pytest.raises(ValueError, match="multiple of 2"):
        section_starts(17, 2, 2)


def test_sides_hold_the_nearest_known_frames():
    m = model()
    video = torch.arange(40.0).view(1, 40, 1, 1).expand(1, 40, 32, 32)
    known = [t < 10 or t >= 30 for t in range(40)]
    ctx = gather_context(video, known, 20, m)
    assert ctx.past_t == [-11, -12, -13, -14, -15, -16, -17, -18, -19]  # frames 9..1; frame 0 is the anchor
    assert ctx.future_t == [10 + i for i in range(10)]
    assert ctx.past_BNHW[0, :, 0, 0].tolist() == list(range(9, 0, -1)) and ctx.anchor_t == -20


# ---- causality ---------------------------------------------------------------------------------


def test_a_future_frame_never_changes_a_past_prediction():
    m = model()
    video = torch.rand(2, 24, 32, 32)
    start = 10
    known = [t < start for t in range(24)]
    before = m(gather_context(video, known, start, m))
    changed = video.clone()
    changed[:, start:] = torch.rand_like(changed[:, start:])
    torch.testing.assert_close(m(gather_context(changed, known, start, m)), before)
    # causal rollouts of different lengths agree where they overlap; the anti-drifting ones need not
    prompt = torch.rand(2, 2, 32, 32)
    short, long = (rollout(m, prompt, n, "causal").video_BLHW for n in (12, 24))
    torch.testing.assert_close(long[:, :12], short)
    short, long = (rollout(m, prompt, n, "inverted").video_BLHW for n in (12, 24))
    assert not torch.allclose(long[:, 2:12], short[:, 2:])


def test_rollout_fills_every_frame_and_counts_bounded_tokens():
    m = model()
    prompt = torch.rand(2, 2, 32, 32)
    for order in ORDERS:
        r = rollout(m, prompt, 64, order)
        assert r.video_BLHW.shape == (2, 64, 32, 32) and len(r.context_tokens) == 31
        assert torch.equal(r.video_BLHW[:, :2], prompt)
        assert max(r.context_tokens) <= m.cfg.context_tokens(22, 22)


def test_flow_head_samples_in_range_reproducibly_and_leaves_regression_alone():
    torch.manual_seed(0)
    flow = FramePack(FramePackConfig(**SMALL, head="flow", flow_steps=3)).eval()
    reg = model()
    assert set(flow.state_dict()) - set(reg.state_dict()) == {"noisy.weight", "noisy.bias", "flow_time.weight", "flow_time.bias"}
    prompt = torch.rand(2, 2, 32, 32)
    a, b, c = (rollout(flow, prompt, 8, "causal", seed=s).video_BLHW for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    ctx = gather_context(torch.rand(2, 10, 32, 32), [t < 6 for t in range(10)], 6, reg)
    torch.testing.assert_close(reg.predict(ctx), (reg.nearest_frame(ctx)[:, None] + reg(ctx)).clamp(0, 1))
