"""Attention backends behind one protocol; metadata reaches layers via forward_context."""
