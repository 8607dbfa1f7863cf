"""nn.Module wrappers over vse_fast.ops."""
