"""The benchmark harness behind ``attention-bench``: this package's Encoder against
torch.nn.TransformerEncoder and x-transformers (needs the ``bench`` extra)."""
