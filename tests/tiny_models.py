"""Tiny deterministic random models built at test time, no download.

One SentencePiece tokenizer (vocab 512, byte fallback) is trained on a small embedded text;
random Llama models that share it are written as a Hugging Face folder (the hub's target) and,
from the same weights, as GGUF files llama.cpp loads (the drafts): f32 is a perfect draft,
q8_0 an imperfect one, and a model with another seed an unrelated one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 512
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0

_CORPUS = """\
the cat sat on the mat and the dog ran in the park with a red ball.
once upon a time there was a little house by the river where an old man lived.
numbers: one two three four five six seven eight nine ten eleven twelve.
she said hello to the baker, bought bread and milk, and walked home slowly.
def add(a, b): return a + b  # a tiny function for a tiny model
the quick brown fox jumps over the lazy dog while birds sing in the trees.
rain fell on the city all night; in the morning the streets were bright and clean.
we write tests so that the code keeps its promises when we change it later.
"""


@dataclass(frozen=True)
class TinyModel:
    hf_dir: Path      # config.json, model.safetensors, tokenizer.model
    gguf_f32: Path    # the same weights for llama.cpp, f32
    gguf_q8: Path     # the same weights quantized to q8_0


def build_tokenizer(out_dir: Path) -> Path:
    """Train the shared SentencePiece model (deterministic: BPE, one thread)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = out_dir / "tokenizer.model"
    if not model_file.exists():
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS.splitlines() * 20), model_prefix=str(out_dir / "tokenizer"),
            vocab_size=VOCAB_SIZE, model_type="bpe", byte_fallback=True, num_threads=1,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, hard_vocab_limit=False,
            minloglevel=2,
        )
    return out_dir


def build_tiny_model(out_dir: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> TinyModel:
    tokenizer_dir = tokenizer_dir or build_tokenizer(out_dir / "tokenizer")
    model = _random_llama(seed)
    hf_dir = out_dir / "hf"
    model.save_pretrained(str(hf_dir))
    shutil.copy(tokenizer_dir / "tokenizer.model", hf_dir / "tokenizer.model")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True,
    }))
    tokenizer = _tokenizer_tables(tokenizer_dir / "tokenizer.model")
    gguf_f32 = out_dir / "tiny-f32.gguf"
    gguf_q8 = out_dir / "tiny-q8_0.gguf"
    _write_gguf(model, tokenizer, gguf_f32, quantize=False)
    _write_gguf(model, tokenizer, gguf_q8, quantize=True)
    return TinyModel(hf_dir, gguf_f32, gguf_q8)


def _random_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Larger weights than a trained init so the next-token distribution is peaked and varied:
        # greedy decoding then wanders instead of repeating one token, and argmax ties are rare.
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.6 if "embed" in name or "lm_head" in name else 0.25))
    return model


@dataclass(frozen=True)
class _TokenizerTables:
    pieces: list[str]
    scores: list[float]
    types: list[int]


def _tokenizer_tables(model_file: Path) -> _TokenizerTables:
    import sentencepiece as spm
    from gguf import TokenType

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces, scores, types = [], [], []
    for index in range(processor.vocab_size()):
        pieces.append(processor.id_to_piece(index))
        scores.append(processor.get_score(index))
        if processor.is_unknown(index):
            types.append(TokenType.UNKNOWN)
        elif processor.is_control(index):
            types.append(TokenType.CONTROL)
        elif processor.is_byte(index):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return _TokenizerTables(pieces, scores, types)


def _permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp expects q/k rows in interleaved rotary order; transformers stores halves."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_tensors(model) -> dict[str, np.ndarray]:
    config = model.config
    state = {name: value.float().numpy() for name, value in model.state_dict().items()}
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors.update({
            f"blk.{layer}.attn_norm.weight": state[prefix + "input_layernorm.weight"],
            f"blk.{layer}.attn_q.weight": _permute_for_llama_cpp(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads),
            f"blk.{layer}.attn_k.weight": _permute_for_llama_cpp(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads),
            f"blk.{layer}.attn_v.weight": state[prefix + "self_attn.v_proj.weight"],
            f"blk.{layer}.attn_output.weight": state[prefix + "self_attn.o_proj.weight"],
            f"blk.{layer}.ffn_norm.weight": state[prefix + "post_attention_layernorm.weight"],
            f"blk.{layer}.ffn_gate.weight": state[prefix + "mlp.gate_proj.weight"],
            f"blk.{layer}.ffn_up.weight": state[prefix + "mlp.up_proj.weight"],
            f"blk.{layer}.ffn_down.weight": state[prefix + "mlp.down_proj.weight"],
        })
    return tensors


def _write_gguf(model, tokenizer: _TokenizerTables, path: Path, quantize: bool) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokenizer.pieces)
    writer.add_token_scores(tokenizer.scores)
    writer.add_token_types(tokenizer.types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in _gguf_tensors(model).items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if quantize and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
