"""Text generation: `llamazoo generate` and `llamazoo chat`.

- engine.py: prefill + decode with the model's static KV cache; left-padded batches with per-row
  positions (each row gives the tokens it gives alone); EOS ids, stop strings, streaming detokenization.
- sampling.py: the one sampling module (repetition penalty, temperature, top-k, top-p, min-p), equal to
  transformers' processors and in their order.
- packed.py: CPU inference weights (fused q/k/v and gate/up, oneDNN-prepacked).
- report.py: the original's latency fields, per row and aggregate. app.py: config -> outputs. chat.py.

Rules: batch_size is between 1 and the number of prompts (the last batch may be smaller); each prompt
needs prompt tokens + max_new_tokens <= model.max_seq_length (default: the model's
max_position_embeddings), or generation.truncate_prompt=left to keep a long prompt's last tokens. A stop
string ends the row at the token that completes it; the completion text ends before the stop string, the
token ids include that token. An EOS token ends the row and is kept in the ids but not in the text.
"""
