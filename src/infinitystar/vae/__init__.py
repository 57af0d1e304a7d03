"""The video tokenizer: a causal 3-D convolutional VAE and the bitwise quantizers on its latent.

* ``layers`` -- building blocks (causal 3-D convolutions with a frame cache, norms, residual blocks, space/time
  down- and upsampling);
* ``model`` -- :class:`~infinitystar.vae.model.VideoVAE`: video <-> (B, 64, T', H/16, W/16) latent, in temporal
  chunks, with an optional tiled decode;
* ``bsq`` -- bitwise spherical quantization of one scale (pure tensor functions);
* ``multiscale`` -- the one multi-scale residual quantizer: latent <-> per-scale bits <-> summed codes, used by
  generation, training (self-correction) and the VAE trainer alike.

May import: ``config`` and leaf modules (``generation.schedules`` for the scale tables and clip layout). Never the
transformer, generation's loop, the pipeline, training or the front doors.
"""
