"""The learned miniature world and the tiny random model factory."""
