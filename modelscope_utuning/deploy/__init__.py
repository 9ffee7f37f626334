"""Deployment: a trained model outside the training stack.

- :mod:`.onnx_export`: ``model.onnx`` with a dynamic batch axis, mergeable tuners folded in first, and the
  preprocessing needed to run it (extra ``[onnx]``).
"""
