"""The paper's algorithm, in the order it runs: ``samplers`` (each denoising step a Gaussian policy with an exact
log-probability, and its preview x0_hat), ``noise`` (one noise stream per trajectory), ``rollout`` (a group of
trajectories per prompt), ``pro_grpo`` (Expand-and-Prune), ``ovf`` (Optimal Variance Filtering), ``grpo`` (group
advantages and the clipped objective J), and ``task`` (what a model, its prompts and its reward must provide).
It depends on torch only and imports nothing else of the package; ``progrpo_ref/minimal.py`` is all of it in one file.
"""
