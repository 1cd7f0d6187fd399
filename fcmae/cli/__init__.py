"""The command-line tools, one module each; `python -m fcmae.<name>` and the `fcmae-<name>`
console scripts run them:

- `export_weights` (fcmae.export): weights and checkpoints into the other formats;
- `write_shards` (fcmae.shards): a folder of images as webdataset shards with their index;
- `shrink_images` (fcmae.shrink): a copy of a folder with large images shrunk;
- `reconstruct_images` (fcmae.reconstruct): what a checkpoint sees and reconstructs;
- `embed_images` (fcmae.embed): one embedding per image of a dataset, in the data's order;
- `benchmark` (fcmae.bench): training steps per backend, and the input pipeline.

The training scripts, pretrain.py and finetune.py, stay at the top of the repository.
"""
