"""Ops: one file per op, each holding its functional API, autograd.Function and dispatch."""
