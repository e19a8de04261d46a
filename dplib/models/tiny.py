"""Tiny random causal LMs for tests: no download, a second per build.

Random Llama / Gemma-3 models with a byte-level BPE tokenizer trained in memory on a fixed text.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TINY_SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>"]


@lru_cache(maxsize=8)
def _tiny_tokenizer_json(vocab_size: int) -> str:
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [topics[k] for k in sorted(topics)][:60]  # a fixed slice of Python's own docs, in the stdlib
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 380):
    """A byte-level BPE tokenizer with `vocab_size` tokens (≥ 260), trained in memory on a fixed text.

    Special tokens: `<bos>` (0), `<eos>` (1), `<pad>` (2); no BOS is added automatically.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(TINY_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least 260.")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(vocab_size)),
                                   bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(vocab_size: int = 380, *, arch: str = "llama", d_model: int = 64, n_layers: int = 2,
               pad_vocab_to: int = 64, seed: int = 0):
    """A tiny random causal LM and its tokenizer, built in memory, frozen, float32, on CPU.

    Args:
        vocab_size: the tokenizer's size; two different sizes give two different vocabularies
            (for cross-tokenizer tests).
        arch: "llama" (RMSNorm, tied embeddings) or "gemma3" (scaled embeddings, Gemma RMSNorm,
            optional final-logit soft-capping via `model.config.final_logit_softcapping`).
        d_model, n_layers: model size.
        pad_vocab_to: the logits width is `len(tokenizer)` rounded up to this multiple, like real
            models whose embedding matrix has padding rows beyond the tokenizer.
        seed: weights are a function of the seed alone.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(vocab_size)
    width = -(-len(tokenizer) // pad_vocab_to) * pad_vocab_to
    common = dict(vocab_size=width, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=d_model // 4, max_position_embeddings=256, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(**common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=d_model // 4)
    else:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; use 'llama' or 'gemma3'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Default init gives near-uniform outputs; larger embeddings make the tiny model opinionated,
        # like a real one, so optimisers face non-trivial targets.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 0.12)
    model.eval()
    model.requires_grad_(False)
    model.dplib_source = {"name": f"tiny-{arch}-{vocab_size}", "kind": "tiny", "seed": seed, "cache_hit": None}
    return model, tokenizer
