"""The network: the family as data (`variants`), its layers, its two blocks, the network, and its export."""
