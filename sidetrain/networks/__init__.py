"""Side-network pieces that several kinds share without being kinds: the ladders and gates (ladders.py), side
blocks of the backbone's own family at 1/r width (family.py), and the encoder side stack (encoder_stack.py)."""
