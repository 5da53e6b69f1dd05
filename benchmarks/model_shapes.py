"""Model shapes shared by the GPU benchmarks (imported by the scripts beside this file)."""

# Llama-3-8B's shape (the benchmarks build it with random weights: nothing is downloaded).
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
