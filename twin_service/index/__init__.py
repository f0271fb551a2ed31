"""Search indexes behind one protocol: the built-in one (in the store) or an external engine."""
