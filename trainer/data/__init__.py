"""Data: the embedded shapes dataset, encoders (VAE / text), encoding images into WebDataset shards of
latents and text embeddings, and the streaming loader that reads them back in a world-size-independent order."""
