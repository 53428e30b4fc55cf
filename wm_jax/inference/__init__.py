"""Inference: the KV-cached samplers (`rollout`), the shot-list language (`shot_script`),
`wm generate` (`generate`) and the output watermark with its provenance (`watermark`)."""
