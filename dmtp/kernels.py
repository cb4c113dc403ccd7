"""Linear layers with prepacked weights for CPU decoding: where speculative decoding's speed on a
CPU comes from.

On a CPU a decoding forward is bound by reading the weights, so verifying L tokens should cost
about what one does. PyTorch's `nn.Linear` (MKL) does not behave so at the few rows a decoding
step feeds: it runs 2 and 3 rows as separate passes over the weights and 4–8 rows at a fraction of
the machine's speed. oneDNN's linear with its weights reordered once into its blocked layout
(what `torch.compile` does with frozen weights on CPU) reads them once at any small row count.
Measured on 2 idle AMD EPYC cores, SmolLM2-135M-Instruct in float32, a base forward of T tokens
after a 300-token cache (tests/benchmarks/bench_kernels.py, both side by side; README, "Speed on a
CPU"):

    T               1     2     3     4     5     7     8
    nn.Linear      56    94   116    84    91   129    91  ms
    packed         39    46    40    39    39    45    47  ms

so greedy decoding runs ~1.45× faster and a verification of 4 tokens costs what one token's does
(1.5× with nn.Linear): τ turns into speedup. The math is the same float32 (or bfloat16) dot
products in another summation order (logits agree to ~1e-4), so greedy and speculative decoding,
both on the packed layers, stay token-for-token equal.

The two oneDNN ops are torch-internal (`torch.ops.mkldnn._reorder_linear_weight`,
`_linear_pointwise`, what inductor emits); torch is pinned and tests/test_kernels.py checks them
against `nn.Linear`. Inference only (no autograd through a packed weight). The `weight` parameter
stays in place, so shapes, dtypes and tied embeddings are untouched; the packed copy is extra
memory of the same size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# oneDNN picks its blocking for this many rows; 4 measured fastest for 1..8 rows (1 and 8 were
# 5-25 % slower at 4-8 rows), the row counts a verification of L = 4 and its token tree feed.
PACKED_BATCH_HINT = 4


class PackedLinear(nn.Module):
    """`nn.Linear` for inference on CPU with the weight prepacked for oneDNN."""

    def __init__(self, linear: nn.Linear, batch_hint: int = PACKED_BATCH_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters, not copies
        # A plain attribute: a buffer would be saved with the model and moved by .to().
        self.__dict__["packed"] = torch.ops.mkldnn._reorder_linear_weight(
            linear.weight.detach(), batch_hint
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def packing_supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    """oneDNN packing applies: a CPU, float32 (or bfloat16 where the CPU has bf16 instructions)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def pack_linears(model: nn.Module, batch_hint: int = PACKED_BATCH_HINT) -> int:
    """Replace `model`'s `nn.Linear` layers by `PackedLinear` in place, where packing applies;
    return how many were replaced (0 on GPUs and unsupported dtypes: the model is left as it is)."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and packing_supported(
                child.weight.dtype, child.weight.device
            ):
                setattr(module, name, PackedLinear(child, batch_hint))
                replaced += 1
    return replaced


def pack_matrix(weight: torch.Tensor, batch_hint: int = PACKED_BATCH_HINT) -> Any:
    """A `[out, in]` matrix as a callable `x -> x @ weight.T`, packed where packing applies."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if packing_supported(weight.dtype, weight.device):
        return PackedLinear(linear, batch_hint)
    return linear
