"""Named base shapes: the real architectures' sizes, for `plan --shape` before a model is downloaded
and for `tools/make_base.py`, which writes random bases of them.

All use the 32000-token Llama/Mistral sentencepiece vocabulary (the one make_base.py ships).
"""

from __future__ import annotations

# name -> (model_type, config fields beside COMMON)
SHAPES = {
    "llama2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)),
    "llama2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)),
    "llama2-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                   sliding_window=4096)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024)),
}
COMMON = dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=False, initializer_range=0.02)


def hf_config(shape: str, dtype: str = "bfloat16", layers: int | None = None):
    """The transformers config of a named shape (`layers` overrides its depth)."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise KeyError(f"unknown shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    model_type, dims = SHAPES[shape]
    dims = dict(dims, **({"num_hidden_layers": layers} if layers else {}))
    config = AutoConfig.for_model(model_type, **COMMON, **dims)
    config.dtype = dtype
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config
