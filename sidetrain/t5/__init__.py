"""Shared T5 (encoder-decoder) training parts: batches, pruned init, recipe helpers and decoding, used by the seq2seq and vision-language kinds."""
