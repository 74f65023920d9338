"""Our toy LM <-> transformers' Llama family, one to one.

Attention, norms and embeddings are Llama's in every case. The feed-forward
blocks pick the architecture:

- dense everywhere -> LlamaForCausalLM;
- MoE -> the first of Mixtral, Qwen2-MoE, GLM-4-MoE whose forward equals ours
  for the config. Qwen3-MoE and OLMoE normalise queries and keys per head and
  DeepSeek-V2/V3 compress keys and values (MLA), so none of those has our
  attention; a config none of the three expresses gets an `Unexportable` error
  listing, per architecture, what it lacks.

Weight layout differences, each handled once below:
- rotary pairs: ours rotates consecutive pairs (2j, 2j+1) of a head, Llama
  rotates (j, j + head_dim/2): the rows of q and k are permuted per head;
- ours fuses [q | k | v] and [gate | up]; transformers keeps them apart
  (but fuses its experts' gate_up as we do, stored (out, in) where ours is (in, out)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from moe_playground.models.moe import MoEConfig
from moe_playground.models.transformer import TransformerConfig

# ---- which architecture ----------------------------------------------------------------------


class Unexportable(ValueError):
    """No transformers architecture computes what this config computes."""


@dataclass(frozen=True)
class Arch:
    model_type: str                # transformers' config.model_type
    cls_name: str                  # its ...ForCausalLM
    shared: str = ""               # module name of the shared experts ("" = none possible)
    why_not: Callable[[TransformerConfig, MoEConfig], list[str]] = lambda m, e: []


def _layout(m: TransformerConfig) -> list[bool]:
    return [m.is_sparse_layer(i) for i in range(m.n_layer)]


def _softmax_router(m: TransformerConfig, e: MoEConfig) -> list[str]:
    return ([f"moe.score_func={e.score_func!r} (softmax only)"] * (e.score_func != "softmax")
            + [f"moe.route_scale={e.route_scale} (1 only)"] * (e.route_scale != 1)
            + [f"moe.n_groups={e.n_groups} (group-limited routing)"] * (e.n_groups != 1)
            + [f"moe.bias_update_rate={e.bias_update_rate} (no expert bias)"] * (e.bias_update_rate != 0))


MIXTRAL = Arch("mixtral", "MixtralForCausalLM", why_not=lambda m, e: _softmax_router(m, e)
               + ["moe.norm_topk=false (always renormalises)"] * (not e.norm_topk)
               + [f"moe.n_shared_experts={e.n_shared_experts} (no shared experts)"] * (e.n_shared_experts > 0)
               + ["dense layers (model.first_k_dense / moe_layer_freq): every layer is MoE"] * (not all(_layout(m))))
QWEN2_MOE = Arch("qwen2_moe", "Qwen2MoeForCausalLM", shared="shared_expert", why_not=lambda m, e: _softmax_router(m, e)
                 + ["moe.shared_gate=false with shared experts (its shared experts are gated)"]
                 * (e.n_shared_experts > 0 and not e.shared_gate))
GLM4_MOE = Arch("glm4_moe", "Glm4MoeForCausalLM", shared="shared_experts", why_not=lambda m, e:
                [f"moe.score_func={e.score_func!r} (sigmoid only)"] * (e.score_func != "sigmoid")
                + ["moe.shared_gate=true (no shared-expert gate)"] * e.shared_gate
                + [f"moe.shared_expert_hidden={e.shared_expert_hidden} (each shared expert as wide as a routed one)"]
                * (e.shared_expert_hidden not in (None, e.hidden_per_expert))
                + ["dense layers after the first MoE layer (model.moe_layer_freq > 1)"]
                * (_layout(m) != [i >= m.first_k_dense for i in range(m.n_layer)]))
LLAMA = Arch("llama", "LlamaForCausalLM")
MOE_ARCHS = (MIXTRAL, QWEN2_MOE, GLM4_MOE)


def choose_arch(m: TransformerConfig, e: MoEConfig) -> Arch:
    """The architecture whose forward equals ours for (model, moe) config; Unexportable, listing what each lacks."""
    if not any(_layout(m)):
        return LLAMA
    common = ([f"moe.routing={e.routing!r} (token choice only)"] * (e.routing != "token_choice")
              + [f"expert capacity at evaluation, moe.eval_capacity_factor={e.eval_capacity_factor} (dropless only: null or .inf)"]
              * (e.capacity(1024, training=False) is not None))
    if common:
        raise Unexportable("no transformers architecture expresses " + "; ".join(common))
    lacks = {a.model_type: a.why_not(m, e) for a in MOE_ARCHS}
    for a in MOE_ARCHS:
        if not lacks[a.model_type]:
            return a
    raise Unexportable("no transformers architecture computes this MoE: "
                       + "; ".join(f"{k} lacks {', '.join(v)}" for k, v in lacks.items())
                       + ". (Qwen3-MoE and OLMoE add query/key norms, DeepSeek-V2/V3 use MLA attention: "
                         "their attention differs from ours.)")


# ---- configs ---------------------------------------------------------------------------------


def hf_config(m: TransformerConfig, e: MoEConfig, arch: Arch):
    """transformers' config for our (model, moe) config under `arch`."""
    import transformers
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layer,
              num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
              max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, tie_word_embeddings=m.tie_embeddings,
              intermediate_size=m.ffn_hidden, attention_dropout=0.0, initializer_range=m.init_std,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch is LLAMA:
        kw.update(attention_bias=False, mlp_bias=False)
    elif arch is MIXTRAL:
        kw.update(intermediate_size=e.hidden_per_expert, num_local_experts=e.n_experts,
                  num_experts_per_tok=e.experts_per_token, sliding_window=None, router_aux_loss_coef=0.0)
    elif arch is QWEN2_MOE:
        kw.update(moe_intermediate_size=e.hidden_per_expert, shared_expert_intermediate_size=e.shared_hidden,
                  num_experts=e.n_experts, num_experts_per_tok=e.experts_per_token, norm_topk_prob=e.norm_topk,
                  qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[i for i, s in enumerate(_layout(m)) if not s],
                  use_sliding_window=False, router_aux_loss_coef=0.0)
    elif arch is GLM4_MOE:
        kw["rope_parameters"]["partial_rotary_factor"] = 1.0
        kw.update(moe_intermediate_size=e.hidden_per_expert, n_routed_experts=e.n_experts,
                  num_experts_per_tok=e.experts_per_token, n_shared_experts=e.n_shared_experts,
                  norm_topk_prob=e.norm_topk, routed_scaling_factor=e.route_scale, n_group=e.n_groups,
                  topk_group=e.topk_groups, first_k_dense_replace=m.first_k_dense, use_qk_norm=False,
                  attention_bias=False)
    config_cls = getattr(transformers, arch.cls_name.replace("ForCausalLM", "Config"))
    return config_cls(**kw)


LLAMA_FAMILY = ("llama", "mistral")  # what `from_hf_config` reads: Llama's layers exactly


def from_hf_config(c, base: TransformerConfig) -> TransformerConfig:
    """Our model config for a Llama-family transformers config `c`; the training-only fields come from `base`.
    ValueError naming what differs when `c` is not a model our layers compute."""
    problems = []
    if c.model_type not in LLAMA_FAMILY:
        problems.append(f"model_type {c.model_type!r} is not one of {LLAMA_FAMILY}")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(c, "rope_theta", 1e4)}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for what, bad in ((f"rope type {rope.get('rope_type')!r} (default only)", rope.get("rope_type", "default") != "default"),
                      (f"hidden_act {getattr(c, 'hidden_act', None)!r} (silu only)", getattr(c, "hidden_act", "silu") != "silu"),
                      ("attention_bias", getattr(c, "attention_bias", False)), ("mlp_bias", getattr(c, "mlp_bias", False)),
                      (f"head_dim {head_dim} != hidden_size / num_attention_heads", head_dim * c.num_attention_heads != c.hidden_size),
                      (f"sliding_window {getattr(c, 'sliding_window', None)}", getattr(c, "sliding_window", None) is not None)):
        if bad and c.model_type in LLAMA_FAMILY:
            problems.append(what)
    if problems:
        raise ValueError("not a Llama-family model this playground computes: " + "; ".join(problems))
    return replace(base, vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, n_layer=c.num_hidden_layers,
                   n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads, d_model=c.hidden_size,
                   ffn_hidden=c.intermediate_size, rope_theta=float(rope["rope_theta"]), norm_eps=c.rms_norm_eps,
                   tie_embeddings=bool(c.tie_word_embeddings))


# ---- weights ---------------------------------------------------------------------------------


def _rotary_rows(w: torch.Tensor, head_dim: int, to_hf: bool) -> torch.Tensor:
    """Permute each head's rows between consecutive-pair rotary (ours) and half-split rotary (Llama)."""
    w_NHD = w.view(-1, head_dim, w.shape[-1])
    if to_hf:  # ours (j, pair) -> Llama (pair, j)
        return w_NHD.unflatten(1, (head_dim // 2, 2)).transpose(1, 2).reshape(w.shape)
    return w_NHD.unflatten(1, (2, head_dim // 2)).transpose(1, 2).reshape(w.shape)


def to_hf_state(m: TransformerConfig, e: MoEConfig, arch: Arch, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' state dict (module names, as `load_state_dict` takes it) for our weights."""
    hd, nq, nkv = m.head_dim, m.n_head * m.head_dim, m.kv_heads * m.head_dim
    out = {"model.embed_tokens.weight": ours["embed.weight"], "model.norm.weight": ours["norm.weight"],
           "lm_head.weight": ours["embed.weight" if m.tie_embeddings else "head.weight"]}
    for i in range(m.n_layer):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = ours[a + "attn.qkv.weight"].split([nq, nkv, nkv])
        out.update({b + "self_attn.q_proj.weight": _rotary_rows(q, hd, True),
                    b + "self_attn.k_proj.weight": _rotary_rows(k, hd, True), b + "self_attn.v_proj.weight": v,
                    b + "self_attn.o_proj.weight": ours[a + "attn.out.weight"],
                    b + "input_layernorm.weight": ours[a + "attn_norm.weight"],
                    b + "post_attention_layernorm.weight": ours[a + "ffn_norm.weight"]})
        if not m.is_sparse_layer(i):
            out.update(_mlp(ours, a + "ffn.", b + "mlp."))
            continue
        out.update({b + "mlp.gate.weight": ours[a + "ffn.router.weight"],
                    b + "mlp.experts.gate_up_proj": ours[a + "ffn.experts.w_gate_up"].transpose(1, 2),
                    b + "mlp.experts.down_proj": ours[a + "ffn.experts.w_down"].transpose(1, 2)})
        if arch is GLM4_MOE:
            out[b + "mlp.gate.e_score_correction_bias"] = ours[a + "ffn.router.expert_bias"]
        if arch.shared:  # zero-width when there are none
            out.update(_mlp(ours, a + "ffn.shared.", f"{b}mlp.{arch.shared}.", empty=(m.d_model, e.shared_hidden)))
        if arch is QWEN2_MOE:
            out[b + "mlp.shared_expert_gate.weight"] = ours.get(a + "ffn.shared_gate.weight", torch.zeros(1, m.d_model))
    return {k: v.contiguous() for k, v in out.items()}


def _mlp(ours: dict, a: str, b: str, empty: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Our fused SwiGLU `a` as transformers' gate/up/down `b` (zero-width when `a` is absent: shared experts
    of a Qwen2-MoE or GLM-4-MoE that has none)."""
    if a + "gate_up.weight" not in ours:
        D, H = empty
        gate = up = torch.zeros(H, D)
        down = torch.zeros(D, H)
    else:
        (gate, up), down = ours[a + "gate_up.weight"].chunk(2), ours[a + "down.weight"]
    return {b + "gate_proj.weight": gate, b + "up_proj.weight": up, b + "down_proj.weight": down}


def from_hf_state(m: TransformerConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict for a dense Llama-family transformers state dict (the inverse of `to_hf_state`)."""
    hd = m.head_dim
    out = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not m.tie_embeddings:
        out["head.weight"] = hf["lm_head.weight"]
    for i in range(m.n_layer):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        out.update({a + "attn.qkv.weight": torch.cat([_rotary_rows(hf[b + "self_attn.q_proj.weight"], hd, False),
                                                      _rotary_rows(hf[b + "self_attn.k_proj.weight"], hd, False),
                                                      hf[b + "self_attn.v_proj.weight"]]),
                    a + "attn.out.weight": hf[b + "self_attn.o_proj.weight"],
                    a + "attn_norm.weight": hf[b + "input_layernorm.weight"],
                    a + "ffn_norm.weight": hf[b + "post_attention_layernorm.weight"],
                    a + "ffn.gate_up.weight": torch.cat([hf[b + "mlp.gate_proj.weight"], hf[b + "mlp.up_proj.weight"]]),
                    a + "ffn.down.weight": hf[b + "mlp.down_proj.weight"]})
    return {k: v.detach().float().contiguous() for k, v in out.items()}
