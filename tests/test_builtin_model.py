"""The built-in checkpoints ship with the package, load, and agree with transformers."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_logits
from mtx.assets import default_checkpoint
from mtx.models import Checkpoint, build_model


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_builtin_matches_transformers(name):
    folder = default_checkpoint(name)
    ck = Checkpoint(folder)
    assert ck.config.sliding_window == 32 and ck.dtype == torch.bfloat16
    assert sum(f.stat().st_size for f in folder.iterdir()) < 12 * 2**20
    ids = torch.tensor([__import__("tokenizers").Tokenizer.from_file(str(folder / "tokenizer.json"))
                        .encode("import os\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n"
                                "        print(name)\n" * 3).ids[:100]])
    assert ids.shape[1] > 3 * 32  # several windows
    ref = hf_logits(folder, ids)
    model = build_model(folder, "float32")
    kv = model.new_kv(1)
    with torch.no_grad():
        got = torch.cat([model(ids[:, s:s + 16], torch.tensor([s]), kv) for s in range(0, ids.shape[1], 16)], 1)
    assert (got - ref).abs().max().item() <= 1e-4
    # trained, not noise: the model predicts this (held-out style) Python much better than uniform
    nll = torch.nn.functional.cross_entropy(got[0, :-1], ids[0, 1:]).item()
    assert nll < 4.0 < torch.log(torch.tensor(2048.0)).item()
