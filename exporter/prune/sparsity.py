"""Unstructured magnitude sparsity: zero the smallest weights of the decoder's linear layers.

Offered because users ask for it, with the measured caveat (docs/pruning.md): onnxruntime's CPU
MatMul and MatMulNBits kernels are dense, so zeros cost the same time, and INT4 packing stores a
zero in the same 4 bits as any other value, so the bundle is not smaller either. Only a generic
compressor (zip of the bundle) sees the zeros. Shapes do not change; use structured pruning for that.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import KoedgeError

SCOPES = ("global", "local")


@dataclass
class SparsityConfig:
    sparsity: float = 0.0  # share of decoder linear weights set to zero
    scope: str = "local"  # local: every matrix reaches the sparsity; global: one threshold for all

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise KoedgeError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise KoedgeError(f"unknown sparsity scope '{self.scope}' (choose from {', '.join(SCOPES)})")


def decoder_linears(model) -> dict[str, object]:
    """Linear layers inside the decoder blocks (not the embedding or LM head)."""
    import torch

    from exporter.prune.structured import decoder_layers

    return {f"{i}.{name}": module for i, layer in enumerate(decoder_layers(model))
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


def _threshold(values, share: float) -> float:
    """The magnitude below which `share` of `values` lie (k-th smallest |value|)."""
    import torch

    k = int(round(values.numel() * share))
    if k == 0:
        return -1.0
    return float(torch.kthvalue(values.reshape(-1), k).values)


def magnitude_prune(model, config: SparsityConfig) -> dict:
    """Zero weights in place; returns the sparsity reached overall and per matrix kind."""
    import torch

    config.check()
    linears = decoder_linears(model)
    if not linears:
        raise KoedgeError("no decoder linear layers to sparsify")
    if config.sparsity == 0:
        return {"sparsity": 0.0}
    with torch.no_grad():
        if config.scope == "global":
            cut = _threshold(torch.cat([m.weight.detach().abs().reshape(-1) for m in linears.values()]),
                             config.sparsity)
            for module in linears.values():
                module.weight.masked_fill_(module.weight.abs() <= cut, 0.0)
        else:
            for module in linears.values():
                cut = _threshold(module.weight.detach().abs(), config.sparsity)
                module.weight.masked_fill_(module.weight.abs() <= cut, 0.0)
    return {"scope": config.scope, "target": config.sparsity, **measure_sparsity(model)}


def measure_sparsity(model) -> dict:
    """Zero share over all decoder linear weights and per projection name (q_proj, down_proj, ...)."""
    zeros: dict[str, list[int]] = {}
    for name, module in decoder_linears(model).items():
        kind = name.split(".")[-1]
        entry = zeros.setdefault(kind, [0, 0])
        entry[0] += int((module.weight == 0).sum())
        entry[1] += module.weight.numel()
    total_zero = sum(z for z, _ in zeros.values())
    total = sum(n for _, n in zeros.values())
    return {"sparsity": round(total_zero / total, 4),
            "by_kind": {kind: round(z / n, 4) for kind, (z, n) in sorted(zeros.items())}}
