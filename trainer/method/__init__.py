"""The method: noise schedule, networks (UNet helpers, discriminator, LoRA), what one training step of each
phase computes, and how a progressive stage expands into phases."""
