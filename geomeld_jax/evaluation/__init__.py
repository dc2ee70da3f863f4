"""Downstream evaluation: GEO-Bench probing/fine-tuning, retrieval, embeddings, visual reports.

Modules: geobench (v1.0 reader, restricted unpickler, band mapping), metrics, probe,
finetune, retrieval, embed, report, run (the table command), bigearthnet_to_geobench.
"""
