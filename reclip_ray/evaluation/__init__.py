"""Zero-shot classification and image-text retrieval of a CLIP model on an eval set, in bounded memory.

One job per module, read top to bottom:

- ``dataset.py``: ``evaluate_dataset``, the whole evaluation of one eval set (what training's phase ends and
  ``reclip-ray eval`` run), as a few named steps;
- ``checkpoint.py``: ``evaluate_checkpoint``, an exported model folder evaluated (``reclip-ray eval``);
- ``eval_set.py``: what an eval set holds (its label sets, columns, a ``--classes`` file) and the checks that need
  no model, run before training starts;
- ``grouping.py``: rows grouped by image into one feature row per unique image, on one rank or across ranks;
- ``metrics.py``: the ranking rule and the numbers (zero-shot top-k, mean per-class recall, recall@k both ways);
- ``gather.py``: the ``torch.distributed`` steps of sharded evaluation (slices, lockstep, gathers, rank 0 only).
"""
