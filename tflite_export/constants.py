"""Constants of the exporter (units in the names).

Both bound how much memory a training step of an exported model holds at once on the device;
the McMahan CNN at batch 20 is the case they were measured on (benchmarks/RESULTS.md).
"""

# Largest patch matrix (im2col) a convolution builds at once: past it, the batch is cut into
# chunks that run one after another, so the arena holds one chunk's patches, not the batch's.
# At 1.5 MiB the CNN's second layer builds its forward patches 2 examples at a time and its
# backward columns 1 at a time; a 4 MiB budget cost ~6 MiB more resident memory, at the
# same step time.
patch_chunk_bytes = 3 << 19

# Largest weight variable: a larger Dense kernel is stored as several variables, blocks of
# its rows. Setting weights slices one block at a time from the flat vector, XNNPACK packs one
# block at a time for each matmul, and the update of one block is done before the next: each
# costs one block's bytes, not the kernel's (6.1 MiB for the CNN's 3136 x 512 kernel).
variable_block_bytes = 2 << 20
