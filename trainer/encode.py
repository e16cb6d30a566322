"""`python -m trainer.encode`: images (a folder, image shards or the shapes dataset) -> shards of latents
and text embeddings. The implementation is trainer/data/encode.py."""
from trainer.data.encode import main

if __name__ == "__main__":
    main()
