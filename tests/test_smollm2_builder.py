"""examples/smollm2.py builds an HF folder that transformers reads exactly as it reads the GGUF."""

from __future__ import annotations

import pytest
from tiny_models import load_smollm2_example


@pytest.mark.slow
def test_hf_folder_matches_gguf_in_transformers() -> None:
    # never skipped: scripts/test.sh installs all of these
    import accelerate  # noqa: F401  (transformers needs it to load a GGUF file)
    import gguf  # noqa: F401
    import torch
    import transformers

    smollm2 = load_smollm2_example()
    gguf_path = smollm2.find_gguf()

    folder = smollm2.build_hf_folder(smollm2.default_cache_dir())
    assert smollm2.is_complete(folder)

    auto = transformers.AutoModelForCausalLM
    ours = auto.from_pretrained(folder, dtype=torch.float32).eval()
    oracle = auto.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    assert ours.config.tie_word_embeddings and ours.config.num_key_value_heads == 3

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = oracle.eval()(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Q/K still in llama.cpp's rotary order would give the wrong next token, so check it too.
    assert tokenizer.decode(got[0, -1].argmax()).strip() == "Paris"
