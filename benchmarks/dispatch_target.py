"""A dispatch-bound CPU stand-in for a small model's GPU pass: a random Llama of 16 layers at
hidden size 64 (4 heads, 2 kv heads, the tiny test models' 512-token tokenizer).

Its pass does almost no arithmetic: what it costs is the host launching ~30 operators a layer,
as a small target's verify pass on a GPU is bound by launching kernels. Built in well under a
second, random weights (seed 0), cached in the folder given.

    .venv/bin/python benchmarks/dispatch_target.py FOLDER   # prints the model folder
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

LAYERS, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 16, 64, 4, 2, 128
MAX_POSITIONS = 8192


def build_dispatch_target(folder: Path) -> Path:
    """The model folder (config, safetensors, tokenizer), built once under `folder`."""
    model_dir = folder / "dispatch-llama-16x64"
    if (model_dir / "config.json").exists():
        return model_dir
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny_models import build_tiny_model

    tiny = build_tiny_model(folder / "tiny", seed=0)  # only for its tokenizer files
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    partial = folder / "dispatch-llama-16x64.partial"
    model.save_pretrained(str(partial))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny.hf_dir / name).exists():
            shutil.copy(tiny.hf_dir / name, partial / name)
    partial.rename(model_dir)
    return model_dir


if __name__ == "__main__":
    print(build_dispatch_target(Path(sys.argv[1])))
