"""Export attention as onnxruntime's fused `com.microsoft.GroupQueryAttention` with an in-place KV cache.

Optimum traces each attention block as a dozen small ops and a `Concat(past, new)`, so past and present
are two tensors and nothing can be written in place. Inside `fused_attention(model)` every attention
module still computes its own projections and QK-norm (traced as before: q/k/v/o stay plain MatMuls with their
FP32 weights), but the rotary embedding, the cache update and the attention itself become one
GroupQueryAttention node per layer (`do_rotary=1`, the model's own cos/sin tables as initializers: one pair
per rope base, so Gemma 3's local and global layers each read theirs; partial rotary as a narrower table). GQA reads the
valid past from `seqlens_k` (from `attention_mask`), so the runtime may bind one preallocated buffer as
both past and present: the kernel appends the new positions in place (runtime/kvcache.py).

How: a pre-hook hands each attention module a stand-in cache whose `update` returns only the new
key/value; the attention function (transformers' `ALL_ATTENTION_FUNCTIONS["sdpa"]`, swapped for the
export) then calls `GroupQueryAttentionOp`, whose ONNX symbolic is the contrib op, and stores its present
outputs in the real cache layer, which Optimum exports as `present.{layer}.*`. Sliding window
(`local_window_size`), softcap and the model's own `scaling` become GQA attributes.

Rotary: while exporting, each modeling module's `apply_rotary_pos_emb` hands q and k back unrotated when the
cos it is given comes from a rotary module whose table can be precomputed (a static rope type: not `dynamic`
or `longrope`, whose frequencies depend on the sequence length) and fits the CPU kernel (head size a multiple
of 16, rotated half-width a multiple of 8); the attention function then asks GQA to rotate with that table.
Otherwise the model's traced rotary stays and GQA gets `do_rotary=0` (e.g. a head size of 16 with
`rotary_pct` 0.5: a 4-wide table, which the kernel refuses). GQA derives positions from `seqlens_k`
(past length + offset), the same positions the graph derives from the all-ones `attention_mask`.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from runtime.errors import KoedgeError

_CACHE_KWARGS = ("past_key_values", "layer_past", "past_key_value")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # frequencies that do not depend on the length


class GroupQueryAttentionOp(torch.autograd.Function):
    """GQA with the kernel's semantics in torch (for tracing) and `com.microsoft::GroupQueryAttention` in ONNX.

    q [b, s, heads*d], k/v [b, s, kv_heads*d], past [b, kv_heads, p, d] -> out [b, s, heads*d], present k, v.
    `window` > 0: a query at position i sees the `window` keys i-window+1 .. i (onnxruntime's `local_window_size`,
    transformers' `sliding_window`; measured against the CPU kernel). With `cos_cache`/`sin_cache` ([positions,
    rotated dims / 2]) the kernel rotates the new q and k first (`do_rotary=1`), at positions past + offset.
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total_length,
                num_heads: int, kv_heads: int, scale: float, window: int, softcap: float, half_kv: bool = False,
                cos_cache=None, sin_cache=None):
        batch, seq, _ = query.shape
        dim = past_key.shape[-1]
        q = query.view(batch, seq, num_heads, dim).transpose(1, 2)
        new_key = key.view(batch, seq, kv_heads, dim).transpose(1, 2)
        if cos_cache is not None:  # the kernel's positions: past length (seqlens_k + 1 - seq) + offset
            positions = (seqlens_k.long() + 1 - seq).unsqueeze(1) + torch.arange(seq).unsqueeze(0)
            cos, sin = (cache.to(query.dtype)[positions].unsqueeze(1) for cache in (cos_cache, sin_cache))
            q, new_key = _rotate(q, cos, sin), _rotate(new_key, cos, sin)
        present_key = torch.cat([past_key, new_key], dim=2)
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
                 num_heads, kv_heads, scale, window, softcap, half_kv=False, cos_cache=None, sin_cache=None):
        def cast(value, to):  # half_kv: GQA in float16; graph_edits.kv_in_float16 then drops the KV casts
            return g.op("Cast", value, to_i=to) if half_kv else value

        inputs = [cast(tensor, FLOAT16) for tensor in (query, key, value, past_key, past_value)]
        rotary = not _is_none(cos_cache)
        tables = [cos_cache, sin_cache] if rotary else []  # already in the attention's dtype
        out, present_key, present_value = g.op(
            "com.microsoft::GroupQueryAttention", *inputs, seqlens_k, total_length, *tables,
            num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
            local_window_size_i=window if window > 0 else -1, softcap_f=softcap, do_rotary_i=int(rotary),
            rotary_interleaved_i=0, outputs=3)
        out, present_key, present_value = (cast(tensor, FLOAT) for tensor in (out, present_key, present_value))
        out.setType(query.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _rotate(x, cos, sin):
    """rotate_half rotary on the first 2 * cos.shape[-1] dims of x [b, h, s, d] (cos/sin [b, 1, s, half])."""
    half = cos.shape[-1]
    first, second, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


@dataclass
class RotaryTable:
    """One rope base's cos/sin table over every position the model allows: [positions, rotated dims / 2]."""

    cos: torch.Tensor
    sin: torch.Tensor

    def fits(self, head_dim: int) -> bool:
        """onnxruntime's CPU kernel: head size a multiple of 16, half-width a multiple of 8 and <= head/2."""
        half = self.cos.shape[1]  # read before tracing: a plain int
        return head_dim % 16 == 0 and half % 8 == 0 and 2 * half <= head_dim


def rotary_table(module, dtype: torch.dtype, max_positions: int | None = None) -> RotaryTable | None:
    """The table a transformers rotary module would compute for positions 0 .. max-1, or None when it cannot
    be precomputed (rope types whose frequencies change with the sequence length)."""
    if getattr(module, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return None
    positions = int(getattr(module, "original_max_seq_len", 0) or module.config.max_position_embeddings)
    positions = min(positions, max_positions or positions)  # the bundle's context (ExportConfig.max_context)
    inv_freq = module.inv_freq.float()
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]  # as the module's matmul
    scaling = float(getattr(module, "attention_scaling", 1.0))
    return RotaryTable((freqs.cos() * scaling).to(dtype), (freqs.sin() * scaling).to(dtype))


def _is_rotary(module) -> bool:
    return isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "rope_init_fn")


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
    tables: dict[int, RotaryTable | None] = field(default_factory=dict)  # id(rotary module) -> its table
    cos_from: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # id(traced cos) -> (cos, rotary)
    current: int | None = None  # id(attention module) running now
    unrotated: dict[int, tuple[torch.Tensor, torch.Tensor, RotaryTable]] = field(default_factory=dict)


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
        table = None
        if (unrotated := state.unrotated.pop(id(module), None)) is not None:
            seen_query, seen_key, table = unrotated
            if query is not seen_query or key is not seen_key:  # its rotary was skipped: GQA must apply it
                raise KoedgeError(f"fused attention: {type(module).__name__} changes q/k between its rotary "
                                  "embedding and the attention")
        flat = [t.transpose(1, 2).reshape(batch, seq, -1) for t in (query, key, value)]
        out, layer.keys, layer.values = GroupQueryAttentionOp.apply(
            *flat, layer.keys, layer.values, seqlens_k, total, heads, kv_heads, scale,
            _sliding_window(kwargs), softcap, state.half_kv, *((table.cos, table.sin) if table else ()))
        return out.view(batch, seq, heads, dim), None

    return attend


def _is_attention(module) -> bool:
    return hasattr(module, "layer_idx") and type(module).__name__.endswith("Attention")


def _norm_in_token_layout(original: Callable) -> Callable:
    """A QK-norm's forward that normalizes a transposed [b, heads, s, d] view in its [b, s, heads, d] layout.

    Gemma 3 and EXAONE 4 apply q_norm/k_norm after `view(...).transpose(1, 2)`; GQA wants [b, s, heads * d], so
    the export transposes back. onnxruntime then pushes the transpose pair through the norm, rewriting its
    ReduceMean axis from -1 to 3, and its RMSNorm fusion no longer recognizes it (rank unknown): twelve ops per
    layer stay. Transposing back before the norm (and again after, to hand the model what it expects) puts the
    two transpose pairs next to each other, where onnxruntime cancels them, and the norm keeps axis -1.
    """
    def forward(x):
        # laid out as [b, s, heads, d] in memory (strides: heads -> d, positions -> heads * d), one KV head too
        if x.dim() == 4 and x.stride(1) == x.shape[3] and x.stride(2) == x.shape[1] * x.shape[3]:
            if x.shape[1] == 1:  # one head (gemma-3-270m's k): normalize [b, s, d] itself, so that the
                # head split and merge around it fold away (graph_edits.fold_reshape_shapes): 2 Reshapes per layer
                batch, _, seq, dim = x.shape
                tokens = original(x.transpose(1, 2).reshape(batch, seq, dim))
                return tokens.reshape(batch, seq, 1, dim).transpose(1, 2)
            return original(x.transpose(1, 2)).transpose(1, 2)  # (exact either way: only the graph differs)
        return original(x)  # Qwen 3 normalizes before its transpose

    return forward


def _rotary_in_gqa(state: _State, original: Callable) -> Callable:
    """`apply_rotary_pos_emb` for the export: q/k unrotated when GQA can rotate them with a precomputed table."""
    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        source = state.cos_from.get(id(cos))
        table = state.tables.get(source[1]) if source is not None and source[0] is cos else None
        if table is None or state.current is None or unsqueeze_dim != 1 or not table.fits(int(q.shape[-1])):
            return original(q, k, cos, sin, position_ids, unsqueeze_dim)
        state.unrotated[state.current] = (q, k, table)
        return q, k

    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_attention(model, half_kv: bool = False, max_positions: int | None = None) -> Iterator[None]:
    """Within the block, exporting `model` writes a GroupQueryAttention node per layer.

    `half_kv`: the attention runs in float16 between casts, so the KV cache can be float16 (half the
    memory) once graph_edits.kv_in_float16 has moved the casts of past and present out of the graph.
    `max_positions`: the rotary tables stop there (the bundle's context; the runtime refuses more).
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
        state.cos_from.clear()
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
                state.current = id(module)
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
    buffers: list[str] = []
    patched: dict = {}  # modeling module -> its own apply_rotary_pos_emb
    norms: list[torch.nn.Module] = []  # QK-norms whose forward is wrapped (instance attribute)
    try:
        table_dtype = torch.float16 if half_kv else next(model.parameters()).dtype  # GQA's own input dtype
        for index, module in enumerate(m for m in model.modules() if _is_rotary(m)):
            table = rotary_table(module, table_dtype, max_positions)
            state.tables[id(module)] = table
            if table is not None:  # model buffers, so each table is one initializer shared by its layers
                for kind, tensor in (("cos", table.cos), ("sin", table.sin)):
                    buffers.append(f"rotary_table_{index}_{kind}")  # not koedge_*: the int8 pass drops those
                    model.register_buffer(buffers[-1], tensor)
            handles.append(module.register_forward_hook(
                lambda rotary, args, out: state.cos_from.__setitem__(id(out[0]), (out[0], id(rotary)))))
        for module in attention_modules:
            home = sys.modules[type(module).__module__]
            if home not in patched and callable(getattr(home, "apply_rotary_pos_emb", None)):
                patched[home] = home.apply_rotary_pos_emb
                home.apply_rotary_pos_emb = _rotary_in_gqa(state, patched[home])
        for module in attention_modules:
            for norm in (getattr(module, "q_norm", None), getattr(module, "k_norm", None)):
                if isinstance(norm, torch.nn.Module):
                    norm.forward = _norm_in_token_layout(norm.forward)
                    norms.append(norm)
        for config in configs.values():
            config._attn_implementation = "sdpa"
        yield
    finally:
        for handle in handles:
            handle.remove()
        for home, original in patched.items():
            home.apply_rotary_pos_emb = original
        for norm in norms:
            del norm.forward
        for name in buffers:
            del model._buffers[name]
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous
        for key, config in configs.items():
            config._attn_implementation = implementations[key]
