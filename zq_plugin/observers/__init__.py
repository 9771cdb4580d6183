"""Observers: range statistics as pure functions, plus torch.ao and torchao observer classes."""
