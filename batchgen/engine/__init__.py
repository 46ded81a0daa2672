"""A batch of jobs becomes images: the model's components, the denoising loop, its helpers."""
