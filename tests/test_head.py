"""The output head (model.head): whichever product it measured fastest for a bucket, the logits
are the model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model import GPT, preset
from model.decode_step import bucket_sizes
from model.head import PRODUCTS, OutputHead


def test_every_bucket_gives_the_models_logits_whichever_product_it_picked() -> None:
    torch.manual_seed(0)
    matrix = GPT(preset("tiny")).eval().output_weight.detach()
    head = OutputHead(matrix, bucket_sizes(16))
    for rows in (1, 2, 3, 4, 8, 13, 16, 40):  # between buckets, and past the last
        hidden = torch.randn(rows, matrix.shape[1])
        torch.testing.assert_close(head(hidden), F.linear(hidden, matrix), rtol=1e-5, atol=1e-5)


def test_each_product_is_the_same_multiplication() -> None:
    matrix, hidden = torch.randn(300, 24), torch.randn(5, 24)
    copy = matrix.t().contiguous()
    for name, product in PRODUCTS.items():
        torch.testing.assert_close(product(hidden, matrix, copy), hidden @ matrix.t(), msg=name)
