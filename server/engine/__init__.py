"""Engines own the model and turn generation requests into streams of tokens.

`base` defines the interface the HTTP layer talks to; implementations live beside it.
"""
