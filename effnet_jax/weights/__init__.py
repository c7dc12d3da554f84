"""Weights from outside: the published files (`published`), PyTorch files read without torch (`torch_reader`), their
key tables (`convert`) and converted model directories (`model_dir`). `effnet_jax.load` reads every source."""
