"""Training: the transformer trainer and the VAE trainer, sharing one skeleton.

* ``config`` -- the training configs, nested by concern (data, model, optimizer, checkpoint, parallelism), and
  their one TOML/JSON loader;
* data: ``data`` (jsonl records, clip sampling, resolution buckets, captions), ``features`` (VAE feature
  extraction into the latent cache), ``dataset`` (the seeded, sharded, resumable dataset over that cache; it imports
  both, neither imports it), ``vae_data`` (pixel clips for the VAE trainer);
* the transformer's step: ``self_correction`` (bitwise self-correction), ``scale_subsets`` (which scales a step
  trains), ``loss``, ``step``, ``ema``;
* the VAE's losses: ``vae_losses`` (PSNR, structural term, PatchGAN);
* the loops and their plumbing: ``trainer``, ``vae_trainer``, ``checkpointing`` (DCP, atomic, safe load),
  ``distributed`` (torchrun, FSDP2, activation checkpointing, applied from outside), ``runlog`` (the run folder
  and its JSON-lines log, the same for both trainers), ``commands`` (the ``train``, ``train-vae`` and ``export``
  subcommands the CLI registers).

May import: ``pipeline`` (a run exports a pipeline folder) and everything below it. Nothing below imports
``train``; only ``demo`` (leaf helpers such as ``vae_losses.psnr``) and ``cli`` do.
"""
