"""From a trained model to search: embeddings of any images on disk (clip-retrieval layout),
and a faiss index over them. The model side (load, embed, export) is rskdist/inference.py.

- layout: OUT/img_emb/*.npy + OUT/metadata/*.parquet, written in parts, resumable.
- images: the sources tools/embed.py reads (a folder, a list file, a split of shards).
- embed: `embed_to_parts`, one rank's share of a source into the layout.
- index: `build_index` (flat or IVF-PQ, parameters from the size), `SearchIndex`.
"""
