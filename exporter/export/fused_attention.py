"""Export attention as onnxruntime's fused `com.microsoft.GroupQueryAttention` with an in-place KV cache.

Optimum traces each attention block as a dozen small ops and a `Concat(past, new)`, so past and present
are two tensors and nothing can be written in place. Inside `fused_attention(model)` every attention
module still computes its own projections, QK-norm and rotary embedding (traced as before: q/k/v/o stay
plain MatMuls with their FP32 weights, partial rotary and per-layer rope bases stay exactly the model's),
but the cache update and the attention itself become one GroupQueryAttention node per layer. GQA reads the
valid past from `seqlens_k` (from `attention_mask`), so the runtime may bind one preallocated buffer as
both past and present: the kernel appends the new positions in place (runtime/kvcache.py).

How: a pre-hook hands each attention module a stand-in cache whose `update` returns only the new
key/value; the attention function (transformers' `ALL_ATTENTION_FUNCTIONS["sdpa"]`, swapped for the
export) then calls `GroupQueryAttentionOp`, whose ONNX symbolic is the contrib op, and stores its present
outputs in the real cache layer, which Optimum exports as `present.{layer}.*`. Sliding window
(`local_window_size`), softcap and the model's own `scaling` become GQA attributes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from runtime.errors import KoedgeError

_CACHE_KWARGS = ("past_key_values", "layer_past", "past_key_value")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types


class GroupQueryAttentionOp(torch.autograd.Function):
    """GQA with the kernel's semantics in torch (for tracing) and `com.microsoft::GroupQueryAttention` in ONNX.

    q [b, s, heads*d], k/v [b, s, kv_heads*d], past [b, kv_heads, p, d] -> out [b, s, heads*d], present k, v.
    `window` > 0: a query at position i sees the `window` keys i-window+1 .. i (onnxruntime's `local_window_size`,
    transformers' `sliding_window`; measured against the CPU kernel).
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length,
                num_heads: int, kv_heads: int, scale: float, window: int, softcap: float, half_kv: bool = False):
        batch, seq, _ = query.shape
        dim = past_key.shape[-1]
        q = query.view(batch, seq, num_heads, dim).transpose(1, 2)
        present_key = torch.cat([past_key, key.view(batch, seq, kv_heads, dim).transpose(1, 2)], dim=2)
        present_value = torch.cat([past_value, value.view(batch, seq, kv_heads, dim).transpose(1, 2)], dim=2)
        groups = num_heads // kv_heads
        k = present_key.repeat_interleave(groups, dim=1)
        v = present_value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        total = present_key.shape[2]
        rows = torch.arange(total - seq, total).unsqueeze(1)
        cols = torch.arange(total).unsqueeze(0)
        allowed = cols <= rows
        if window > 0:
            allowed = allowed & (cols > rows - window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return out.transpose(1, 2).reshape(batch, seq, num_heads * dim), present_key, present_value

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total_length,
                 num_heads, kv_heads, scale, window, softcap, half_kv=False):
        def cast(value, to):  # half_kv: GQA in float16; graph_edits.kv_in_float16 then drops the KV casts
            return g.op("Cast", value, to_i=to) if half_kv else value

        inputs = [cast(tensor, FLOAT16) for tensor in (query, key, value, past_key, past_value)]
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", *inputs, seqlens_k,
            total_length, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
            local_window_size_i=window if window > 0 else -1, softcap_f=softcap, do_rotary_i=0, outputs=3)
        out, present_key, present_value = (cast(tensor, FLOAT) for tensor in (out, present_key, present_value))
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


@dataclass
class _NewOnly:
    """Stands in for the cache inside one attention module: `update` hands back only the new key/value."""

    cache: object
    layer: int | None = None

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        self.layer = layer_idx
        return key_states, value_states


@dataclass
class _State:
    half_kv: bool = False  # GQA runs in float16 with a float16 KV cache
    stand_ins: dict[int, _NewOnly] = field(default_factory=dict)  # id(attention module) -> its stand-in
    mask: torch.Tensor | None = None  # the 2D attention_mask of the current forward


def _sliding_window(kwargs) -> int:
    """Keys a query sees on this layer, itself included (0: all)."""
    window = kwargs.get("sliding_window")
    return int(window) if window else 0


def _attention(state: _State):
    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        stand_in = state.stand_ins.get(id(module))
        if stand_in is None or stand_in.layer is None or state.mask is None:
            raise KoedgeError(f"fused attention: {type(module).__name__} did not go through the KV cache")
        layer = stand_in.cache.layers[stand_in.layer]
        batch, _, seq, _ = query.shape  # traced sizes: the graph stays dynamic in batch and sequence
        heads, kv_heads, dim = int(query.shape[1]), int(key.shape[1]), int(query.shape[3])  # attributes
        scale = float(scaling) if scaling is not None else dim ** -0.5
        softcap = float(kwargs.get("softcap") or 0.0)
        mask = state.mask
        seqlens_k = (mask.sum(dim=1) - 1).to(torch.int32)
        total = torch._shape_as_tensor(mask)[1].to(torch.int32)
        flat = [t.transpose(1, 2).reshape(batch, seq, -1) for t in (query, key, value)]
        out, layer.keys, layer.values = GroupQueryAttentionOp.apply(
            *flat, layer.keys, layer.values, seqlens_k, total, heads, kv_heads, scale,
            _sliding_window(kwargs), softcap, state.half_kv)
        return out.view(batch, seq, heads, dim), None

    return attend


def _is_attention(module) -> bool:
    return hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention")


@contextlib.contextmanager
def fused_attention(model, half_kv: bool = False) -> Iterator[None]:
    """Within the block, exporting `model` writes a GroupQueryAttention node per layer.

    `half_kv`: the attention runs in float16 between casts, so the KV cache can be float16 (half the
    memory) once graph_edits.kv_in_float16 has moved the casts of past and present out of the graph.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state = _State(half_kv=half_kv)
    handles = []

    def capture_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is None or mask.dim() != 2 or ids is None:
            raise KoedgeError("fused attention needs the input_ids and 2D attention_mask inputs")
        state.mask = mask
        if kwargs.get("position_ids") is None:  # else the model counts positions from the past's length,
            # which is the whole preallocated buffer once past and present share it
            positions = mask.cumsum(dim=1) - 1
            return args, {**kwargs, "position_ids": positions[:, -ids.shape[1]:]}
        return None

    def hand_stand_in(module, args, kwargs):
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                stand_in = _NewOnly(kwargs[name])
                state.stand_ins[id(module)] = stand_in
                return args, {**kwargs, name: stand_in}
        raise KoedgeError(f"fused attention: {type(module).__name__} got no KV cache as a keyword argument")

    attention_modules = [module for module in model.modules() if _is_attention(module)]
    if not attention_modules:
        raise KoedgeError(f"fused attention: no attention modules found in {type(model).__name__}")
    inner = next((module for module in model.modules() if module is not model
                  and isinstance(getattr(module, "layers", None), torch.nn.ModuleList)), None)
    if inner is None:
        raise KoedgeError(f"fused attention: no decoder stack (a `layers` list) in {type(model).__name__}")
    handles.append(inner.register_forward_pre_hook(capture_mask, with_kwargs=True))
    handles += [module.register_forward_pre_hook(hand_stand_in, with_kwargs=True) for module in attention_modules]
    configs = {id(module.config): module.config for module in model.modules() if hasattr(module, "config")}
    implementations = {key: config._attn_implementation for key, config in configs.items()}
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _attention(state)
    try:
        for config in configs.values():
            config._attn_implementation = "sdpa"
        yield
    finally:
        for handle in handles:
            handle.remove()
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        for key, config in configs.items():
            config._attn_implementation = implementations[key]
