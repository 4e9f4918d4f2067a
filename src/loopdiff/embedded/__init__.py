"""The embedded default: a miniature T2I-CompBench world, a tiny pretrained SD-format pipeline, rewards."""
