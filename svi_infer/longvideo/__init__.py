"""The long-video app: plan a request (settings, adapters, inputs) before torch loads, then generate clip after
clip with :class:`~svi_infer.longvideo.generator.LongVideoGenerator`, resumable, into one mp4 and a sidecar JSON.
``python -m svi_infer`` is its CLI (:mod:`svi_infer.__main__`, config schema in :mod:`.config`)."""
