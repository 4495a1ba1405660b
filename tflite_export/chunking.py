"""How the exporter cuts large tensors into pieces that run (or are stored) one after another.

Both budgets bound how much memory a training step of an exported model holds at once on the
device; the McMahan CNN at batch 20 is the case they were measured on (benchmarks/RESULTS.md).
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


def even_ranges(items: int, bytes_per_item: int, budget_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over `items`, as even as may be, none over `budget_bytes` (but at
    least one item each): one range when all fit. Even sizes let the arena planner give every
    range's tensor the same slot."""
    per_range = max(1, min(items, budget_bytes // max(bytes_per_item, 1)))
    count = -(-items // per_range)
    per_range = -(-items // count)
    return [(start, min(start + per_range, items)) for start in range(0, items, per_range)]
