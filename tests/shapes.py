"""The tiny shapes the fixture modules share, in a module that imports nothing, so fixtures
that need no torch (tests/serve_cases.py) use the same models as those that do."""

GPT_NEO = dict(vocab_size=97, hidden_size=32, num_heads=4, max_position_embeddings=64, window_size=3)

# 8 buckets up to distance 12: the encoder's bidirectional buckets are exact up to 2 and
# logarithmic up to 12, the decoder's exact up to 4; longer sequences reach the last bucket.
T5 = dict(
    vocab_size=71,
    d_model=24,
    d_kv=6,
    d_ff=40,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
