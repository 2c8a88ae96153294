"""Int8 weights for CPU inference.

Each linear layer keeps its weight as int8 with one scale per output row, packed once for
fbgemm; activations are quantized on the fly per call ("dynamic" quantization). The output head
is most of the weights, so it is quantized too, untied from the embedding, whose lookup stays
exact.

We call torch's quantized ops directly rather than through ``torch.ao``'s module wrappers: the
wrappers are deprecated in favour of torchao, and their Python-side dispatch costs more than
the int8 matrix product itself at batch 1.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from model.gpt import GPT


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().cpu()
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the quantized-tensor constructors' deprecation notice
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        # reduce_range=True: 7-bit activations keep fbgemm's int16 accumulation from saturating
        # on CPUs without VNNI, as torch.ao does on x86.
        return torch.ops.quantized.linear_dynamic.default(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: GPT) -> GPT:
    """A CPU copy of ``model`` with every linear layer, the output head included, in int8."""
    quantized = copy.deepcopy(model).float().cpu()
    # Its own copy of the output matrix, so quantizing it leaves a tied embedding as it was.
    quantized.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
    quantized.lm_head.weight = nn.Parameter(model.output_weight.detach().float().cpu().clone())
    _replace_linears(quantized)
    return quantized.eval()


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child)
