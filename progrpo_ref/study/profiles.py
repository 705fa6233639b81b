"""Every size a notebook uses, per profile: "full" (the study; what a reader opening a notebook gets) and "quick"
(nbval's check in ``make test``: the same code on small sizes, seconds per notebook). A notebook reads its own with
``Study(notebook).size``; nothing else in a notebook depends on the profile.

``train`` holds the ``TrainConfig`` fields of the notebook's runs, ``task`` the ``DigitsTask`` fields (the
evaluation's sizes; ``ScenesTask``'s in notebook 08); the study's runs are 4 prompts per update, G = 24, evaluated on
fixed-seed ODE samples.
"""

QUICK_TRAIN = dict(num_updates=2, eval_every=2, prompts_per_update=2)
QUICK_TASK = dict(eval_per_class=2, eval_group=8)

SIZES = {
    "00_pro_grpo_from_scratch": {
        "full": dict(trained_updates=60, fidelity_prompts=10),
        "quick": dict(trained_updates=6, fidelity_prompts=2),
    },
    "01_flow_model_and_rewards": {
        "full": dict(per_digit=8, group=24, hack=dict(num_updates=80, eval_every=10)),
        "quick": dict(per_digit=3, group=8, hack=dict(num_updates=4, eval_every=2)),
    },
    "02_reward_clustering": {
        "full": dict(groups_per_digit=10, train=dict(num_updates=80, eval_every=5)),
        "quick": dict(groups_per_digit=1, train=dict(num_updates=4, eval_every=2)),
    },
    "03_ovf_ablations": {  # 4 arms x 5 seeds, k in {6, 18} x 3 seeds, split and top x 3 seeds: 32 runs of 80 updates
        "full": dict(seeds=[0, 1, 2, 3, 4], sweep_seeds=[0, 1, 2], train=dict(num_updates=80, eval_every=10), task={}),
        "quick": dict(seeds=[0, 1], sweep_seeds=[0], train=QUICK_TRAIN, task=QUICK_TASK),
    },
    "04_pro_grpo": {  # 3 arms x 5 seeds, start size 32 / 64 and prune points x 3 seeds: 30 runs of 80 updates
        "full": dict(seeds=[0, 1, 2, 3, 4], ablation_seeds=[0, 1, 2], groups_per_digit=2, fidelity_group=24,
                     timing_updates=5, train=dict(num_updates=80, eval_every=10), task={}),
        "quick": dict(seeds=[0, 1], ablation_seeds=[0], groups_per_digit=1, fidelity_group=8, timing_updates=1,
                      train=QUICK_TRAIN, task=QUICK_TASK),
    },
    "05_diffusion_and_samplers": {  # 2 diffusion arms x 5 seeds x 60 updates, 4 flow arms x 3 seeds x 80 updates
        "full": dict(seeds=[0, 1, 2, 3, 4], cps_seeds=[0, 1, 2], groups_per_digit=2, fidelity_group=24, timing_updates=3,
                     diffusion=dict(num_updates=60, eval_every=10), flow=dict(num_updates=80, eval_every=10),
                     task=dict(eval_group=16)),
        "quick": dict(seeds=[0, 1], cps_seeds=[0], groups_per_digit=1, fidelity_group=8, timing_updates=1,
                      diffusion=QUICK_TRAIN, flow=QUICK_TRAIN, task=QUICK_TASK),
    },
    "06_real_pipelines": {  # the tiny pipelines are the same in both profiles; "full" trains a few more updates
        "full": dict(updates=6),
        "quick": dict(updates=2),
    },
    "07_when_to_prune": {  # 6 arms x (5 + 3) seeds x 60 updates, a screen of 3 runs, a CPS and a DDIM run
        "full": dict(seeds=[0, 1, 2, 3, 4], second_seeds=[0, 1, 2], screen_updates=60, groups_per_digit=4, group=24,
                     audit_every=10, train=dict(num_updates=60, eval_every=10), task={}),
        "quick": dict(seeds=[0], second_seeds=[0], screen_updates=2, groups_per_digit=1, group=8, audit_every=2,
                      train=dict(num_updates=4, eval_every=2, prompts_per_update=2), task=QUICK_TASK),
    },
    "08_scenes": {  # 5 arms x 3 seeds x 30 updates of the scenes model, fidelity on 2 policies, samples
        "full": dict(seeds=[0, 1, 2], train=dict(num_updates=30, eval_every=10), task={}, fidelity_per_category=4,
                     fidelity_group=24, timing_updates=3, samples=8),
        "quick": dict(seeds=[0], train=dict(num_updates=2, eval_every=2, prompts_per_update=2),
                      task=dict(eval_per_category=1, eval_per_prompt=1, eval_group=4), fidelity_per_category=1,
                      fidelity_group=8, timing_updates=1, samples=2),
    },
}
