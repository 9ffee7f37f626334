"""Deployment: a trained model outside the training stack.

- :mod:`.onnx_export`: ``model.onnx`` with a dynamic batch axis, mergeable tuners folded in first, and the
  preprocessing needed to run it (extra ``[onnx]``);
- :mod:`.app`: a small Gradio page that classifies an uploaded image (extra ``[gradio]``); a trained ``output/``
  folder carries an ``app.py`` that serves it on the folder itself.
"""
