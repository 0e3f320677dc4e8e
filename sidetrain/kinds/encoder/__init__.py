"""The text-encoder kind of stage 2 (BERT-family backbones): side network, pruned init, prediction."""
