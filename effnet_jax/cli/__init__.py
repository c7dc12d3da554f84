"""The commands: effnet-train, effnet-evaluate, effnet-predict, effnet-export, effnet-convert, and the family table
(`python -m effnet_jax.cli.family`). Each parses flags and calls the library; none imports another."""
