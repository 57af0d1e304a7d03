"""Generation: from a request to summed codes, in latent space, with no I/O.

* ``schedules`` -- pure tables and rules: dynamic-resolution pyramids, the clip layout, repetitions, the
  semantic/detail split, the per-step plan (:class:`~.schedules.ScaleStep`) (the official settings are
  the pipeline presets in ``config``);
* ``plan`` -- the one plan object of a request (:class:`~.plan.GenerationPlan`): schedule, clip layout,
  repetitions, steps, latent frame counts, forced (teacher-forced) steps; the pixel <-> latent frame formulas;
* ``sampling`` -- pure: temperature, CFG/APG guidance, per-bit sampling;
* ``loop`` -- the autoregressive loop over a plan, forced-bit steps and every interactive turn; progress is
  reported through a callback, never drawn here.

May import: ``config``, ``transformer``, ``vae`` (the multi-scale quantizer). ``schedules`` and ``sampling`` import
nothing from the package, so ``config``, ``transformer`` and ``vae`` may import them. This ``__init__`` imports
nothing, so importing one submodule never pulls in the others.
"""
