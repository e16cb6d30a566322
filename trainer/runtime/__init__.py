"""The runtime: DeepSpeed engines, collectives, the training loop, checkpoints, preemption, logging and the
distributed environment. Nothing here knows what a diffusion model is."""
