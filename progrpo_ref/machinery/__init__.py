"""What scales the algorithm and keeps it safe: ``config`` (``TrainConfig``, every field checked, the named arms),
``trainer`` (the training loop), ``run`` (its bookkeeping: progress, history, evaluation, resume), ``checkpoint``
(safetensors, atomic and durable) and ``parallel`` (data parallelism over ``torch.distributed``). It imports the
algorithm and ``beyond_paper``; neither imports it.
"""
