"""Model FLOPs per token (for MFU, `fpm plan` and the benchmarks).

Training FLOPs per token = 6·N_matmul + 12·L·d·s: 6 per weight of every matrix multiply (forward 2,
backward 4, including the output projection onto the vocabulary; embedding lookups are free) plus
the attention score and value products (Kaplan et al. 2020; PaLM's MFU definition). Activation
recomputation is not counted: MFU counts model FLOPs, not hardware FLOPs.

BERT's masked-LM head only has to score the masked positions (``mask_prob`` of the tokens, 15%),
and fpm computes it only there, so its FLOPs count at that fraction: counting the full
vocabulary projection at every position would credit fpm with work it does not do.
"""

from __future__ import annotations

from fpm.config.schema import ModelCfg


def matmul_params(cfg: ModelCfg, vocab_size: int, mask_prob: float = 0.15) -> float:
    """Weights that take part in a matrix multiply per token (biases and norms ignored); BERT's
    MLM head (transform + vocabulary projection) counts for the masked fraction of tokens."""
    d, f, h = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.d_head
    ffn = (3 if cfg.activation.startswith("gated") else 2) * d * f
    attn = 4 * d * h
    if cfg.family == "t5":
        enc = cfg.n_encoder_layers * (attn + ffn)
        dec = cfg.n_decoder_layers * (2 * attn + ffn)
        return enc + dec + d * vocab_size
    head = d * vocab_size if cfg.family != "bert" else mask_prob * (d * vocab_size + d * d)
    return cfg.n_layers * (attn + ffn) + head


def train_flops_per_token(cfg: ModelCfg, vocab_size: int, seq_len: int, target_len: int | None = None,
                          mask_prob: float = 0.15) -> float:
    """Training FLOPs per (input) token. For encoder-decoders the decoder's tokens are counted
    through ``target_len`` per ``seq_len`` input tokens."""
    h = cfg.n_heads * cfg.d_head
    if cfg.family != "t5":
        return 6.0 * matmul_params(cfg, vocab_size, mask_prob) + 12.0 * cfg.n_layers * h * seq_len
    d, f = cfg.d_model, cfg.d_ff
    ffn = (3 if cfg.activation.startswith("gated") else 2) * d * f
    attn = 4 * d * h
    t = target_len or max(1, seq_len // 4)
    enc = 6.0 * cfg.n_encoder_layers * (attn + ffn) * seq_len + 12.0 * cfg.n_encoder_layers * h * seq_len * seq_len
    dec = (6.0 * cfg.n_decoder_layers * (2 * attn + ffn) * t + 6.0 * d * vocab_size * t
           + 12.0 * cfg.n_decoder_layers * h * t * (t + seq_len))
    return (enc + dec) / seq_len
