"""Tiny deterministic random models built at test time, no download.

One SentencePiece tokenizer (vocab 512, byte fallback) is trained on a small embedded English
text. Random Llama models that share it are written twice from the same numpy weights:

- as a Hugging Face folder (config.json, model.safetensors, tokenizer.model): the hub's target;
- as GGUF files llama.cpp loads (the client's drafts): f32 is a perfect draft, q8_0 an
  imperfect one, and a model built with another seed an unrelated one.

Building needs only numpy, sentencepiece, safetensors and gguf (no torch, no transformers), takes
a few tens of milliseconds and is bit-for-bit deterministic for a given seed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --- shape of every tiny model ------------------------------------------------------------
VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # SentencePiece's <unk>, <s>, </s>
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2  # grouped-query attention: both backends handle it, so it gets exercised
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 1024
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5

# Standard deviations of the random weights, chosen by measurement. A trained-style init (0.02)
# gives nearly context-free logits, so greedy decoding falls into a short loop. These values give
# peaked distributions (logits of std ~4) that still depend on the context: 32-token greedy runs
# use ~27 distinct tokens and every prompt continues differently. llama.cpp's default f16 KV cache
# moves logits by ~1e-2, which flips a near-tie argmax about once per 500 greedy tokens; with
# these values seeds 0-2 agree with transformers on 16/16 prompts x 32 tokens (an f32 KV cache
# agrees always), while the q8_0 copy drifts off after a median ~8 tokens.
EMBEDDING_STD = 0.5
OUTPUT_STD = 0.5
PROJECTION_STD = 0.2
# Ids below this are <unk>, <s>, </s> and the 256 byte pieces (SentencePiece puts them first).
# Their output rows are shrunk so generated text is made of real pieces (readable, valid UTF-8)
# and almost never ends at </s> (P < 1e-4 per token even when sampling at temperature 1): tests
# must bound generation with max_tokens rather than wait for EOS.
_FIRST_TEXT_PIECE = 3 + 256
NON_TEXT_OUTPUT_SCALE = 0.3

_TRAINING_TEXT = """\
The cat sat on the mat, and the dog ran in the park with a red ball.
Once upon a time there was a little house by the river where an old man lived alone.
He kept a small garden with beans, carrots, onions and three apple trees.
Every morning he walked to the village to buy bread, milk and a newspaper.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
The year 2024 had 366 days; 1 + 2 = 3, 4 * 5 = 20, 7 - 8 = -1 and 9 / 3 = 3.
She said hello to the baker, bought some bread and walked home slowly.
The quick brown fox jumps over the lazy dog while birds sing in the trees.
Rain fell on the city all night; in the morning the streets were bright and clean.
We write tests so that the code keeps its promises when we change it later.
def add(a, b):
    return a + b
for i in range(10):
    print(i * 2)
Speculative decoding lets a small draft model propose tokens that a large model checks.
If the large model agrees, many tokens are accepted at once and the answer arrives sooner.
The weather today is cloudy with a chance of rain in the afternoon and wind at night.
Please remember to water the plants, feed the cat and lock the door before you leave.
Mountains rise above the valley, and a cold river runs between the green hills.
The train leaves the station at seven o'clock and arrives in the capital by noon.
Children played in the snow, built a snowman and threw snowballs at each other.
What is your name? Where do you live? How old are you? Why is the sky blue?
The library opens at nine and closes at five, except on Sundays when it is closed.
A good cup of coffee, a warm fire and a long book make a perfect winter evening.
Scientists measured the temperature of the ocean and found it warmer than before.
The market sells fresh fish, fruit, vegetables, cheese, flowers and warm bread.
I think, therefore I am. To be or not to be, that is the question.
Good morning! Thank you very much. You are welcome. See you tomorrow.
The computer reads the file, counts the words and prints the result on the screen.
In spring the flowers bloom, in summer the sun is hot, and in autumn the leaves fall.
"""


@dataclass(frozen=True)
class TinyModel:
    hf_dir: Path  # Hugging Face folder: config.json, model.safetensors, tokenizer files
    gguf_f32: Path  # the same weights as GGUF f32 (llama.cpp, or transformers with gguf_file=)
    gguf_q8: Path  # the same weights quantized to q8_0: an imperfect draft


# --- tokenizer ----------------------------------------------------------------------------
def build_tokenizer(out_dir: Path) -> Path:
    """Train the shared SentencePiece tokenizer into `out_dir/tokenizer.model`; return `out_dir`.

    BPE, because llama.cpp's "llama" tokenizer re-derives the segmentation by merging the
    highest-scoring adjacent pieces, which is exactly SentencePiece BPE. The settings are those of
    the original Llama tokenizer: no Unicode normalisation and no whitespace collapsing (llama.cpp
    does neither), a dummy "▁" prefix, digits split, unknown characters spelled as bytes.
    One thread and a fixed in-memory corpus make the file bit-for-bit reproducible.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TRAINING_TEXT.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return out_dir


@dataclass(frozen=True)
class _Vocab:
    """The tokenizer as GGUF stores it: pieces, merge scores and token types, by id."""

    pieces: list[str]
    scores: list[float]
    types: list[int]


def _read_vocab(model_file: Path) -> _Vocab:
    import sentencepiece as spm
    from gguf import TokenType

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    assert processor.vocab_size() == VOCAB_SIZE, processor.vocab_size()

    def token_type(index: int) -> TokenType:
        # llama.cpp needs BYTE for <0xNN> pieces (byte fallback) and CONTROL for <s> and </s>.
        if processor.is_unknown(index):
            return TokenType.UNKNOWN
        if processor.is_control(index):
            return TokenType.CONTROL
        if processor.is_byte(index):
            return TokenType.BYTE
        return TokenType.NORMAL

    ids = range(VOCAB_SIZE)
    return _Vocab(
        pieces=[processor.id_to_piece(i) for i in ids],
        scores=[processor.get_score(i) for i in ids],
        types=[int(token_type(i)) for i in ids],
    )


# --- weights ------------------------------------------------------------------------------
def _random_weights(seed: int) -> dict[str, np.ndarray]:
    """Random float32 Llama weights under transformers' names, drawn in a fixed order."""
    rng = np.random.default_rng(seed)

    def normal(std: float, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    kv_size = NUM_KV_HEADS * HEAD_DIM
    weights = {"model.embed_tokens.weight": normal(EMBEDDING_STD, VOCAB_SIZE, HIDDEN_SIZE)}
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}."
        weights.update(
            {
                prefix + "input_layernorm.weight": np.ones(HIDDEN_SIZE, np.float32),
                prefix + "self_attn.q_proj.weight": normal(PROJECTION_STD, HIDDEN_SIZE, HIDDEN_SIZE),
                prefix + "self_attn.k_proj.weight": normal(PROJECTION_STD, kv_size, HIDDEN_SIZE),
                prefix + "self_attn.v_proj.weight": normal(PROJECTION_STD, kv_size, HIDDEN_SIZE),
                prefix + "self_attn.o_proj.weight": normal(PROJECTION_STD, HIDDEN_SIZE, HIDDEN_SIZE),
                prefix + "post_attention_layernorm.weight": np.ones(HIDDEN_SIZE, np.float32),
                prefix + "mlp.gate_proj.weight": normal(PROJECTION_STD, INTERMEDIATE_SIZE, HIDDEN_SIZE),
                prefix + "mlp.up_proj.weight": normal(PROJECTION_STD, INTERMEDIATE_SIZE, HIDDEN_SIZE),
                prefix + "mlp.down_proj.weight": normal(PROJECTION_STD, HIDDEN_SIZE, INTERMEDIATE_SIZE),
            }
        )
    weights["model.norm.weight"] = np.ones(HIDDEN_SIZE, np.float32)
    lm_head = normal(OUTPUT_STD, VOCAB_SIZE, HIDDEN_SIZE)  # untied from the embedding
    lm_head[:_FIRST_TEXT_PIECE] *= NON_TEXT_OUTPUT_SCALE
    weights["lm_head.weight"] = lm_head
    return weights


# --- Hugging Face folder ------------------------------------------------------------------
def _hf_config() -> dict:
    """config.json as a Hub Llama checkpoint spells it (written by hand: no transformers import)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }


# transformers 5 converts tokenizer.model into its fast LlamaTokenizer on load (a few ms here).
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": True,
    "clean_up_tokenization_spaces": False,
    "model_max_length": MAX_POSITIONS,
}


def _write_hf_folder(folder: Path, weights: dict[str, np.ndarray], tokenizer_model: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_hf_config(), indent=2) + "\n")
    # "format": "pt" is what transformers expects in the header of a torch checkpoint.
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n"
    )


# --- GGUF ---------------------------------------------------------------------------------
def _permute_for_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from transformers' rotary layout to llama.cpp's.

    transformers rotates each head's first half against its second half (rotate_half); llama.cpp's
    "normal" RoPE for Llama rotates adjacent pairs. This is convert_hf_to_gguf.py's permutation;
    transformers' GGUF loader applies the inverse, so both backends compute the same attention.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensors(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The transformers-named weights under llama.cpp's names (q/k permuted)."""
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
        "output.weight": weights["lm_head.weight"],
    }
    for layer in range(NUM_LAYERS):
        hf, cpp = f"model.layers.{layer}.", f"blk.{layer}."
        q_proj = weights[hf + "self_attn.q_proj.weight"]
        k_proj = weights[hf + "self_attn.k_proj.weight"]
        tensors.update(
            {
                cpp + "attn_norm.weight": weights[hf + "input_layernorm.weight"],
                cpp + "attn_q.weight": _permute_for_llama_cpp(q_proj, NUM_HEADS),
                cpp + "attn_k.weight": _permute_for_llama_cpp(k_proj, NUM_KV_HEADS),
                cpp + "attn_v.weight": weights[hf + "self_attn.v_proj.weight"],
                cpp + "attn_output.weight": weights[hf + "self_attn.o_proj.weight"],
                cpp + "ffn_norm.weight": weights[hf + "post_attention_layernorm.weight"],
                cpp + "ffn_gate.weight": weights[hf + "mlp.gate_proj.weight"],
                cpp + "ffn_up.weight": weights[hf + "mlp.up_proj.weight"],
                cpp + "ffn_down.weight": weights[hf + "mlp.down_proj.weight"],
            }
        )
    return tensors


def _write_gguf(
    path: Path, name: str, weights: dict[str, np.ndarray], vocab: _Vocab, quantize: bool, chat_template: str = ""
) -> None:
    """Write a llama.cpp GGUF: hyperparameters, the full tokenizer, then the tensors.

    With `quantize`, every matrix is stored as q8_0 (norm vectors stay f32, as llama.cpp's own
    quantizer leaves them). A `chat_template` goes in the metadata, as a chat model's GGUF carries one.
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(MAX_POSITIONS)
    writer.add_embedding_length(HIDDEN_SIZE)
    writer.add_block_count(NUM_LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE_SIZE)
    writer.add_head_count(NUM_HEADS)
    writer.add_head_count_kv(NUM_KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
    writer.add_vocab_size(VOCAB_SIZE)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")  # SentencePiece-style: merges by score, byte fallback
    writer.add_token_list(vocab.pieces)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)  # SentencePiece's dummy "▁" prefix
    if chat_template:
        writer.add_chat_template(chat_template)

    for tensor_name, array in _gguf_tensors(weights).items():
        if quantize and array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(tensor_name, np.ascontiguousarray(array, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --- public entry point -------------------------------------------------------------------
def build_tiny_model(out_dir: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> TinyModel:
    """Build one random tiny Llama under `out_dir` (hf/, tiny-f32.gguf, tiny-q8_0.gguf).

    Models built with different seeds but the same `tokenizer_dir` (from `build_tokenizer`) share
    their vocabulary, which is what a draft/target pair needs. Without `tokenizer_dir` the
    tokenizer is trained into `out_dir/tokenizer` (always the same one: training is deterministic).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_model = (tokenizer_dir or build_tokenizer(out_dir / "tokenizer")) / "tokenizer.model"
    vocab = _read_vocab(tokenizer_model)
    weights = _random_weights(seed)

    model = TinyModel(hf_dir=out_dir / "hf", gguf_f32=out_dir / "tiny-f32.gguf", gguf_q8=out_dir / "tiny-q8_0.gguf")
    _write_hf_folder(model.hf_dir, weights, tokenizer_model)
    _write_gguf(model.gguf_f32, f"tiny-llama-seed{seed}-f32", weights, vocab, quantize=False)
    _write_gguf(model.gguf_q8, f"tiny-llama-seed{seed}-q8_0", weights, vocab, quantize=True)
    return model


def write_chat_draft(path: Path, chat_template: str, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """The q8_0 draft of the model of `seed`, its GGUF carrying `chat_template` (a chat model's own)."""
    tokenizer_model = (tokenizer_dir or build_tokenizer(path.parent / "tokenizer")) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f"tiny-llama-seed{seed}-q8_0-chat"
    _write_gguf(
        path, name, _random_weights(seed), _read_vocab(tokenizer_model), quantize=True, chat_template=chat_template
    )
    return path


def build_tiny_gemma(folder: Path, tokenizer_dir: Path, kv_heads: int, seed: int) -> Path:
    """A random Gemma 3 text model in `folder` (4 layers, hidden 64, 4 query heads of 16 dims,
    `kv_heads` key/value heads, a sliding window of 8 on all layers but the third), with the tiny
    tokenizer of `tokenizer_dir`: small enough for every test, with Gemma's sliding window."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    model.save_pretrained(str(folder))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
