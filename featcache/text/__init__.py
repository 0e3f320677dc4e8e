"""Text datasets and text backbones, shared by every kind of store with a text part (encoder, seq2seq,
vision_language): reading a labelled dataset (sources.py), tokenising and labelling it (splits.py), the
frozen text encoder (backbone.py) and the text part it computes (part.py)."""
