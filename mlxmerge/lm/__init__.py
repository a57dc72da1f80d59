"""One language-model layer: every forward pass of eval, sae and abliterate goes through here.

* ``load``      — (model, tokenizer) through mlx-lm after mlxmerge's checkpoint checks; model facts
* ``blocks``    — the decoder-block list of any mlx-lm model and the one wrapper swapped into it
* ``chat``      — chat-templated prompt tokens, pad / EOS / special ids
* ``generate``  — left-padded batches with batch caches, last-token logits, greedy and sampled decoding
* ``logprobs``  — log-softmax, per-token log-probabilities (ensembles too), KL, cross-entropy
"""
