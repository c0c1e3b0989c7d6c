"""Where the forward pass runs: the runtimes a model can serve on.

- choice.py: which runtime serves, decided from the manifest and this host before loading, and the
  one fallback policy (fall_back) when a compiled package turns out unfit later;
- torchscript.py and compiled.py: the two runners (model.pt, and the AOTInductor package model.pt2);
- rows.py: what every runner hands back (one float row per image) and the probe pass;
- plan.py: which passes the inference threads will run (PassPlan), so each gets its compiled shape;
- loading.py: loading the chosen runner, the check of each compiled shape, and the warm-up rounds each needs.

The inference threads (serve/model/scheduler.py) call a runner; they never look inside one.
"""
