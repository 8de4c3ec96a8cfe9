"""GPU embeddings: ``gpu="any"`` gives every container a GPU of its own.

``python -m examples.gpu_embeddings`` runs on a GPU node (with torch, when installed);
``python -m examples.gpu_embeddings --gpus "0:A100,1:A100"`` simulates one anywhere.
"""
